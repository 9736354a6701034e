"""What the PEFT methods that change a step's ops add to the memory replay (``paramcalc.activations``).

- **Bottleneck adapters** (AdapterHub, ``paramcalc.tuners.adapter``) are ops spliced into the family's flow
  where AdapterHub's hook runs them (the family file's ``[[adapter_sites]]``: ``runs_after``, ``residual``,
  ``layer_norm``). The hook turns the sub-layer's output ``h`` into ``h + up(act(down(z)))``, with
  ``z = [LN](h + x)`` for Pfeiffer (``original_ln_before``) and ``z = h`` for Houlsby, after casting ``z`` to
  the adapter's dtype (``z.to(weight.dtype)``: the weights' dtype, fp32 under autocast). ``down`` and ``up``
  are Linears of their own rows (``"<row> down"``, ``"<row> up"``) in the replay's modules (``modules``). The
  hook runs inside the hooked module's call: what dies meanwhile lives until it returns (``Hooks``).
- **Prefix tuning** (peft ``get_prompt``): before the model runs, the prefix encoder (its rows: a lookup of
  ``b x n_v`` tokens, with ``projection=true`` then Linear -> tanh -> Linear) makes ``b x n_v x 2*L*H`` keys and
  values, cast to the model's dtype; transformers' cache (``DynamicCache``; an ``EncoderDecoderCache`` of a
  doubled copy on T5, whose cross-attention half is dropped) copies them layer by layer (``cache_prefix``).
  Each prefixed self-attention (``flops_methods.prefixed``) concatenates its layer's prefix in front of its own
  keys and values (``paramcalc.attention``): ``n_v`` more keys, and masks and position biases ``n_v`` wider
  (``paramcalc.masks``). Backward hands each layer's prefix its slice of the cached keys' and values' gradients
  as views, which keep those gradients alive until the prefix encoder's backward, after every layer's.

Torch-free: the analytic path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import expr
from .errors import ParamcalcError
from .flops import _Module, _modules
from .ledger import Record, Value

# AdapterHub's non_linearity (tuners.adapter.NON_LINEARITY) -> the activation torch runs
ADAPTER_ACTIVATION = {"relu": "relu", "swish": "silu"}


@dataclass
class Linear(_Module):
    """A Linear a method adds (an adapter's down or up projection): every parameter trains."""

    bias: int = 0  # elements of its bias (autocast caches a half-precision copy of it as of the weight)


@dataclass
class Hooks:
    """Where forward hooks run in the flow: from a ``starts`` op to an ``ends`` op what dies is held by the hook
    (its locals and arguments) until it returns; ``temporaries`` (values no local holds) die at their last read."""

    starts: set[str] = field(default_factory=set)
    ends: set[str] = field(default_factory=set)
    temporaries: set[str] = field(default_factory=set)
    held: list[int] = field(default_factory=list)
    running: bool = False

    def scope(self, op: str, scope: list[int]) -> list[int]:
        """Where the values that die at ``op`` go: the hook's locals while one runs, else ``scope``."""
        self.running = self.running or op in self.starts
        return self.held if self.running else scope

    def after(self, op: str, ledger) -> None:
        """After ``op`` ran: a hook that returns frees what only it held."""
        if op in self.ends:
            for tid in self.held:
                ledger.drop(tid)
            self.held.clear()
            self.running = False


PREFIX = "prefix"  # the stream of peft's prefix keys and values


def options(result, method: str):
    return next((o for m, o in result.peft_options if m == method), None)


def _adapter_rows(result, family) -> list[tuple[dict, object]]:
    """(site, row) for each adapter the model has."""
    rows = {c.name: c for c in result.components if c.kind == "adapter"}
    return [(site, rows[f"adapter after {site['after']}"]) for site in family.adapter_sites
            if f"adapter after {site['after']}" in rows]


def flow(result, family) -> tuple[dict[str, list[str]], Hooks]:
    """The family's flow, part by part, with the ops the methods add; and where the adapters' hooks run."""
    parts = {part: list(ops) for part, ops in family.flow.items()}
    hooks = Hooks(temporaries=set(family.temporaries))
    prefix = options(result, "prefix")
    if prefix is not None:  # peft's get_prompt runs before the model
        first = family.tasks[result.task].parts[0]
        parts[first] = _prefix_ops(prefix) + parts[first]
        hooks.temporaries |= {PREFIX, f"{PREFIX} e", f"{PREFIX} h"}
    adapter = options(result, "adapter")
    if adapter is None:
        return parts, hooks
    from .tuners.adapter import NON_LINEARITY, ORIGINAL_LN_BEFORE

    activation = ADAPTER_ACTIVATION[NON_LINEARITY[adapter.kind]]
    for site, row in _adapter_rows(result, family):
        ops, after = parts[site["part"]], list(site.get("runs_after", ()))
        at = [i for i in range(len(ops) - len(after) + 1) if after and ops[i:i + len(after)] == after]
        if len(at) != 1:
            raise ParamcalcError(f"the {family.name} family file places {row.name!r} after {after} in its "
                                 f"{site['part']} flow, which matches {len(at)} places, not one")
        # the hooked module's output is the hook's h; what the hook returns takes that output's stream name
        index = at[0] + max(i for i, op in enumerate(after) if op != "|")
        head, _, name = ops[index].partition(":")
        sources, _, output = head.partition("->")
        h = f"{row.name} h"
        ops[index] = f"{sources.strip()} -> {h} : {name.strip()}"
        added = _adapter_ops(row.name, h, output.strip(), site["residual"], site.get("layer_norm"),
                             ORIGINAL_LN_BEFORE[adapter.kind], activation)
        end = at[0] + len(after)
        ops[end:end] = added
        # The hook runs inside the hooked module's call, whose caller still binds the module's input; a module
        # that returned before (a "|" between) has freed its own locals already.
        hooks.starts.add(ops[index] if after[-1] != "|" else added[0])
        hooks.ends.add(added[-1])
        hooks.temporaries |= {f"{row.name} {name}" for name in ("z cast", "d", "u")}
    return parts, hooks


def _adapter_ops(row: str, h: str, output: str, x: str, layer_norm: str | None, ln_before: bool,
                 activation: str) -> list[str]:
    z, cast, d, u = (f"{row} {name}" for name in ("z", "z cast", "d", "u"))
    ops = [f"{h},{x} -> {z} : +", *([f"{z} -> {z} : {layer_norm}"] if layer_norm else []),
           f"{z} -> {cast} : upcast"] if ln_before else [f"{h} -> {cast} : upcast"]
    return ops + [f"{cast} -> {d} : {row} down", f"{d} -> {d} : act {activation}", f"{d} -> {u} : {row} up",
                  f"{h},{u} -> {output} : +"]


def _prefix_ops(prefix) -> list[str]:
    """The prefix encoder (peft's PrefixEncoder), then the cast to the model's dtype and the cache's copies."""
    if prefix.projection:
        encoder = [f"-> {PREFIX} e : prefix embedding", f"{PREFIX} e -> {PREFIX} h : prefix MLP in",
                   f"{PREFIX} h -> {PREFIX} h : act tanh", f"{PREFIX} h -> {PREFIX} : prefix MLP out (keys and values)"]
    else:
        encoder = [f"-> {PREFIX} : prefix keys and values (prompt_encoder)"]
    return encoder + [f"{PREFIX} -> {PREFIX} : upcast"]


def check_prefix(result, family, step) -> None:
    """Refuse the prefix tuning steps that do not run: ``flops_methods.check_prefix``'s, and the families whose
    models take no past key values in transformers 5.24."""
    from .flops_methods import check_prefix as refused

    if family.peft.get("past_key_values", True) is False:
        raise ParamcalcError(f"prefix tuning on {family.title}: from transformers 5.24 its models take no past key "
                             "values, so peft cannot run the step ('Model does not support past key values')")
    if result.task in ("seq-cls", "token-cls"):
        raise ParamcalcError(f"prefix tuning on {result.hf_class}: peft's classification models look for a "
                             "past_key_values argument in the model's forward, which transformers 5.24 no longer has "
                             "('Model does not support past key values')")
    refused(result, family, step)  # (positions the prefix takes: step.check_fits_model)


def cache_prefix(prefix: Value, record: Record, ledger, ctx) -> dict[int, tuple[Value, Value]]:
    """transformers' cache of peft's prefix: each prefixed layer's keys and values, copied out of ``prefix``
    (``b x n_v x 2*L*H``), as stages of ``record``. Returns layer -> (keys, values)."""
    from .flops_methods import prefixed

    layers = next(core for core in ctx.family.attention if prefixed(core, ctx.family))["repeat"]
    layers = expr.evaluate(layers, ctx.values)
    source = prefix
    if any(core["q_len"] != core["k_len"] for core in ctx.family.attention):
        # an encoder-decoder: peft doubles the prefix (torch.cat([p, p])) for the cross-attention cache, which
        # it then replaces by an empty one: those copies die at once
        source = Value(ledger.new(2 * prefix.bytes, "activations"), 2 * prefix.elements, prefix.width, prefix.grad)
        record.stages.append(Record([prefix], source, [], [], []))
    each = prefix.elements // (2 * layers)  # one layer's keys (or values)
    cache = {}
    for layer in range(layers):
        pair = [Value(ledger.new(each * prefix.width, "activations"), each, prefix.width, prefix.grad)
                for _ in range(2)]
        record.stages += [Record([source], value, [], [], []) for value in pair]
        cache[layer] = tuple(pair)
    if source is not prefix:
        cross = [ledger.new(each * prefix.width, "activations") for _ in range(2 * layers)]
        for tid in [source.tid, *cross]:
            ledger.drop(tid)
    return cache


def prefix_length(core: dict, ctx) -> int:
    """Keys and values peft's prefix puts in front of this attention core's own."""
    from .flops_methods import prefixed

    return ctx.prefix_tokens if ctx.prefix_tokens and prefixed(core, ctx.family) else 0


def modules(result, family, values: dict) -> dict[str, _Module]:
    """The rows the replay's ops run (``flops._modules``), with the Linears the methods add."""
    rows = _modules(result, family, values)
    prefix = options(result, "prefix")
    if prefix is not None:  # the prefix encoder: every parameter trains
        from .flops_methods import prefix_dim

        tokens, dim = values["b"] * prefix.tokens, prefix_dim(family, values)
        kv = 2 * expr.evaluate(family.peft["num_layers"], values) * dim
        hidden = prefix.hidden or dim
        if prefix.projection:
            rows["prefix embedding"] = _Module("embedding", tokens, 0, dim, True, True)
            rows["prefix MLP in"] = Linear("linear", tokens, dim, hidden, True, True, bias=hidden)
            rows["prefix MLP out (keys and values)"] = Linear("linear", tokens, hidden, kv, True, True, bias=kv)
        else:
            rows["prefix keys and values (prompt_encoder)"] = _Module("embedding", tokens, 0, kv, True, True)
    for site, row in _adapter_rows(result, family):
        tokens = expr.evaluate(family.tokens.get(site["part"], "b*s"), values)
        # (the bottleneck's symbol is "b", which the step's values give the batch: sizes come from the count's)
        hidden, width = (expr.evaluate(d, result.values) for d in row.shapes["adapter_up.weight"])
        rows[f"{row.name} down"] = Linear("linear", tokens, hidden, width, True, True, bias=width)
        rows[f"{row.name} up"] = Linear("linear", tokens, width, hidden, True, True, bias=hidden)
    return rows


def gradients(result, family, grads: dict[str, list[list[tuple[str, int]]]]) -> None:
    """Split each adapter row's gradients (``activations._gradients_by_row``) between its down and up rows."""
    for _, row in _adapter_rows(result, family):
        layers = grads.pop(row.name, [])
        for half, part in (("down", ".adapter_down."), ("up", ".adapter_up.")):
            grads[f"{row.name} {half}"] = [[g for g in layer if part in g[0]] for layer in layers]
