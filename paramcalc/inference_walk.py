"""One step of ``generate()``, op by op: the prompt's forward (prefill) or one new token's (decode), over the family
file's ``[flow]``, with the key/value cache it fills; then generate's greedy pick (``paramcalc.inference_generate``,
which holds what generate does around the forward: the inputs it keeps, the pick, torch's fused CPU attention's
per-thread scratch).

Inference keeps nothing for backward (``generate`` runs under ``torch.no_grad``, the model in eval mode: dropout
returns its input), so a value lives from the op that makes it to its last read, or until the Python function
that holds it returns (the flow's ``"|"`` and ``keep`` marks), as in the training replay (``paramcalc.walk``, whose
stream bookkeeping this reuses). What each op allocates, measured with torch 2.13 on a CPU (allocator events,
transformers 5.24):

- a Linear / Conv1D its output; a LayerNorm its output and a mean and a reciprocal deviation per token (fp32,
  freed as it returns); an embedding lookup ``b x q`` rows (generate passes ``position_ids`` per sequence);
- GPT-2's tanh GELU (``gelu_new``, written out in Python) three input-sized temporaries at its widest, BLOOM's
  ``bloom_gelu`` four (``ops.ACTIVATION_FORWARD_SCRATCH``);
- the cache: ``DynamicLayer.update`` concatenates the new keys (then values) onto the cached ones, so each is a
  new contiguous tensor, and the old one is freed only once the new one exists; a sliding-window layer frees the old
  keys and values only once both new ones exist, and keeps a window of positions (``paramcalc.inference_cache``).
  The attention rebinds its ``key_states, value_states`` to what the update returns, so the projected (and rotated)
  keys and values die there, before the kernel runs (Llama's ``LlamaAttention.forward``);
- sdpa (no dropout in eval: the fused kernel) its output and a log-sum-exp per row; eager attention the
  ``b x heads x q x k`` scores, the mask added to them, the softmax (fp32 where the family asks) and its cast
  back, all alive until the attention returns where the family says so (``scores_held``); grouped-query eager
  attention (``eager_attention_forward``) copies the keys and values to every query head (``repeat_kv``), locals
  freed as it returns, before the output projection;
- the LM head only the last position (generate passes ``logits_to_keep=1``).

Torch-free: the analytic path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import expr, masks
from .attention import kv_heads
from .flops import ELEMENTWISE, _base_name, _layers, _modules
from .inference_cache import kept, visible, windows
from .inference_generate import Pass, flash_packs, flash_scratch, kept_inputs, matmul_scratch, model_inputs, pick
from .ledger import Ledger, Value
from .memory import DTYPE_BYTES
from .ops import ACTIVATION_FORWARD_SCRATCH, activation_name
from .walk import SCOPE_END, forget, io, last_reads, let_go, reads, release

# Input-sized temporaries an op written out in Python holds at its widest in a forward without autograd, beyond its
# input (the output takes the place of the last): GPT-2's NewGELUActivation computes 0.5 * x, then x ** 3 and
# 0.044715 * x ** 3 while 0.5 * x is alive; BLOOM's as in training (ops.ACTIVATION_FORWARD_SCRATCH); rotary
# positions (apply_rotary_pos_emb, on q or k) hold x * cos, rotate_half(x) (a torch.cat) and rotate_half(x) * sin.
FORWARD_SCRATCH = {"gelu_new": 3, "rotary": 3, **ACTIVATION_FORWARD_SCRATCH}
MADE = ("mask", "rotary")  # the forward tensors inference makes (lookups and zeros: T5's, not decoder-only models')


class InferenceLedger(Ledger):
    """The replay's ledger with two more categories: the key/value cache and the token ids / masks."""

    def __init__(self):
        super().__init__()
        self.totals.update(kv_cache=0, inputs=0)


def cached_cores(result, family) -> list[tuple[int, dict]]:
    """(index, core) of each attention core of the task's parts whose keys and values the cache keeps."""
    parts = family.tasks[result.task].parts
    return [(i, core) for i, core in enumerate(family.attention) if core["part"] in parts and core.get("kv_cache")]


def run(result, family, p: Pass, weights: int, quant=None) -> Ledger:
    """Replay one generate step (prefill when ``p.past == 0``, else one decode step) and return its ledger: its
    timeline's peak and what was alive then, by category."""
    ledger = InferenceLedger()
    ledger.new(weights, "weights")
    b, q = p.batch, p.tokens
    grown, ids, previous = kept_inputs(ledger, p)
    values = {**result.values, "b": b, "s": q}
    cache: dict[tuple[int, int], tuple[int | None, list[int]]] = {}  # (core, layer) -> window, keys and values
    for index, core in cached_cores(result, family):
        layers = expr.evaluate(core.get("repeat", "1"), values)
        for layer, window in enumerate(windows(result, layers)):
            positions = kept(window, p.prompt, p.past)
            elements = b * kv_heads(core, values) * positions * expr.evaluate(core["head_dim"], values)
            cache[index, layer] = window, [ledger.new(elements * p.kv_width, "kv_cache") for _ in "kv"] if p.past \
                else []
    step = model_inputs(ledger, p)  # the prefill's die as _prefill returns, a decode step's at the next step
    logits = _Walk(result, family, p, ledger, values, cache, quant).forward()
    if not p.past:
        release(step, ledger)
    pick(ledger, p, logits, grown, ids, previous)
    return ledger


class _Walk:
    """One forward of the model over the flow: the streams between ops, and what Python scopes hold."""

    def __init__(self, result, family, p: Pass, ledger, values: dict, cache: dict, quant):
        self.result, self.family, self.p, self.ledger = result, family, p, ledger
        self.values, self.cache = values, cache
        self.parts = family.tasks[result.task].parts
        self.modules = _modules(result, family, values)
        head = {_base_name(c.name) for c in result.components if c.part == self.parts[-1]}
        for name, module in self.modules.items():
            if module.kind in ("embedding", "tied") and module.fan_in == 0:
                module.tokens = p.batch * p.tokens  # a lookup of b x q ids (position ids per sequence)
            elif name in head:
                module.tokens = p.batch  # logits_to_keep=1: the last position only
        self.quant = quant
        # the model's sliding window (its mask is made once for every sliding layer), or None
        self.window = next((w for i, core in cached_cores(result, family)
                            for w in windows(result, expr.evaluate(core.get("repeat", "1"), values)) if w), None)
        self.quantized = {_base_name(name) for name in quant.quantized} if quant else set()
        self.streams: dict[str, Value] = {}
        self.scope: list[int] = []  # what the running function's locals hold until it returns ("|")
        self.block: list[int] = []  # what the layer's locals hold until it returns (eager attention's weights)
        self.returned: list[int] = []  # what the layer returns besides its output: held until the next one returns
        self.layer = 0

    def new(self, elements: int, width: int, category: str = "activations") -> Value:
        return Value(self.ledger.new(elements * width, category), elements, width, False)

    def forward(self) -> Value:
        """Run every part of the task; return the logits (what outlives the model's forward, with the cache)."""
        ledger, streams, flow = self.ledger, self.streams, self.family.flow
        sequence = [(op, i == 0) for part in self.parts for _ in range(_layers(self.result, part))
                    for i, op in enumerate(flow.get(part, []))]
        dies = iter(last_reads(sequence, set(self.modules), keep={"y", io(flow[self.parts[-1]][-1])[1]}))
        pinned: dict[str | None, list[int]] = {}
        block, previous = self.block, []  # (previous: what the last layer returned, which the model still holds)
        for part in self.parts:
            ops = flow.get(part, [])
            for spec in self.family.forward_tensors:  # masks, biases, rotary tables: made once for the part's layers
                if spec["part"] == part and masks.made_for(spec, self.p.attention) and self._makes(spec):
                    streams[spec["name"]] = self._make(spec)
            for self.layer in range(_layers(self.result, part)):
                written: set[str] = set()
                arguments = [ledger.hold(streams[n].tid) for n in reads(ops) if n in streams]
                for op in ops:
                    if op == SCOPE_END:
                        next(dies)
                        release(self.scope, ledger)
                        continue
                    words, source = op.partition(":")[2].split(), io(op)[0][:1]
                    if words and words[0] == "keep" and source and source[0] in streams:
                        until = words[1] if len(words) > 1 else None
                        (block if until == "block" else pinned.setdefault(until, [])).append(
                            ledger.hold(streams[source[0]].tid))
                    self.op(op, written)
                    # streams no local holds (the family's temporaries: Llama's SwiGLU products) die at once
                    let_go(next(dies), streams, self.scope, ledger, self.family.temporaries)
                release(self.scope, ledger)
                release(block, ledger)
                release(previous, ledger)
                previous.extend(self.returned)
                self.returned.clear()
                for tid in arguments:
                    ledger.drop(tid)
            release(previous, ledger)
            release(pinned.pop(part, []), ledger)
            for spec in self.family.forward_tensors:  # the stack's forward returns: what it made for its layers dies
                if spec["until"] == part:
                    forget(streams, spec["name"], ledger)
        logits = streams.pop("y")
        for value in streams.values():  # the model's forward returns: only the logits (and the cache) outlive it
            ledger.drop(value.tid)
        for tids in pinned.values():
            release(tids, ledger)
        return logits

    def op(self, op: str, written: set[str]) -> None:
        names, target = io(op)
        name = op.partition(":")[2].strip()
        if any(n not in self.streams for n in names):  # a branch this config does not have
            return
        inputs = [self.streams[n] for n in names]
        kind = name.split(" ")[0]
        if kind in ("keep", "dropout") or (kind == "upcast" and inputs[0].width == self.p.width):
            out = inputs[0]  # kept as it is; dropout in eval returns its input
            self.ledger.hold(out.tid)
        elif kind == "first-token":
            out = Value(self.ledger.hold(inputs[0].tid), inputs[0].elements // self.p.tokens, inputs[0].width, False)
        elif kind in ("+", "*", "scale"):  # out of place, broadcast to the larger input
            out = self.new(max(v.elements for v in inputs), max(v.width for v in inputs))
        elif kind in ("act", "rotary"):
            x = inputs[0]
            what = activation_name(name.split()[1], self.result.config) if kind == "act" else kind
            extra = FORWARD_SCRATCH.get(what, 0)
            if extra:
                self.ledger.drop(self.ledger.new(int(extra * x.bytes), "transient"))
            out = self.new(x.elements, x.width)
        elif kind in ELEMENTWISE:  # an elementwise op the walk has no rule for: an output like its input
            out = self.new(inputs[0].elements, inputs[0].width)
        elif name.startswith("attention core"):
            index = int(name.rsplit(" ", 1)[-1]) - 1
            out = self.attention(index, self.family.attention[index], inputs, names)
        elif name.startswith("mixture of experts"):
            out = self.experts(name, inputs[0])
        else:
            module = self.modules.get(name.removesuffix(" [tied]"))
            if module is None:  # a row this config does not have
                if target not in written:
                    forget(self.streams, target, self.ledger)
                return
            out = self.module(name, module, inputs[0] if inputs else None)
        written.add(target)
        if target in self.streams:
            self.ledger.drop(self.streams[target].tid)
        self.streams[target] = out

    def module(self, name: str, module, x: Value | None) -> Value:
        kind, width, new, ledger = module.kind, self.p.width, self.new, self.ledger
        if kind in ("embedding", "tied") and module.fan_in == 0:  # a lookup
            return new(module.tokens * module.fan_out, width)
        if kind == "layernorm":  # the output, then a mean and a reciprocal deviation per token (fp32) while it runs
            out = new(x.elements, width)
            ledger.drop(ledger.new(2 * module.tokens * 4, "transient"))
            return out
        if kind == "rmsnorm":  # in Python: x in fp32, its mean square, x * rsqrt(...), cast back, times the weight
            upcast = new(x.elements, 4) if width != 4 else None
            variance, normalised = new(module.tokens, 4), new(x.elements, 4)
            for value in (upcast, variance):
                if value is not None:
                    ledger.drop(value.tid)
            cast = new(x.elements, width) if width != 4 else None
            out = new(x.elements, width)
            for value in (cast, normalised):
                if value is not None:
                    ledger.drop(value.tid)
            return out
        if _base_name(name.removesuffix(" [tied]")) in self.quantized and self.quant.options.type != "int8":
            # Linear4bit casts its input to the compute dtype and the output back; in eval on a CPU bitsandbytes
            # multiplies the packed weight directly (no dequantized copy, measured), as its GPU kernels do
            compute = DTYPE_BYTES[self.quant.options.compute_dtype]
            if compute != width:
                operand, out = new(x.elements, compute), new(module.tokens * module.fan_out, compute)
                ledger.drop(operand.tid)
                cast = new(out.elements, width)
                ledger.drop(out.tid)
                return cast
        if kind in ("linear", "conv1d", "tied"):
            out = new(module.tokens * module.fan_out, width)
            # (nn.Linear multiplies by W^T, Conv1D by W as stored: only the former is fp16's one-row gemv)
            self.scratch(module.tokens, module.fan_in, module.fan_out, gemv=kind != "conv1d")
            return out
        return new(x.elements, x.width)

    def scratch(self, m: int, k: int, n: int, batch: int = 0, gemv: bool = False) -> None:
        """oneDNN's scratchpad for a half-precision product on a CPU, alive while the call runs (after its output)."""
        if self.p.device == "cpu":
            size = matmul_scratch(m, k, n, self.p.dtype, self.p.threads, batch, gemv)
            if size:
                self.ledger.drop(self.ledger.new(size, "transient"))

    def attention(self, index: int, core: dict, inputs: list[Value], names: list[str]) -> Value:
        """The cache update of one layer, then the attention kernel over the positions the cache returns."""
        p, values, new, ledger = self.p, self.values, self.new, self.ledger
        b, q, k = p.batch, p.tokens, p.keys
        heads, dim = expr.evaluate(core["heads"], values), expr.evaluate(core["head_dim"], values)
        kv = kv_heads(core, values)
        width = p.width
        if (index, self.layer) in self.cache:
            k = self._update(self.cache[index, self.layer], b * kv * dim * p.kv_width)
            if len(set(names)) == 3:  # key_states, value_states = cache.update(...): the rotated k and v die
                for name in names[1:]:  # (a fused projection's q, k and v are views of one tensor q keeps)
                    forget(self.streams, name, ledger)
        extras = masks.read_by(core, self.streams)
        if p.attention != "eager":  # sdpa without dropout: the fused kernel
            # generate's mask is all ones: sdpa gets none (is_causal), but for a sliding window its keys reach; that
            # boolean mask sdpa turns into a float b x 1 x q x k one in the query's dtype. sdpa_attention_forward
            # hands grouped K/V heads to torch as they are without a mask (enable_gqa); with one it folds a single
            # query's heads onto them (pack_gqa: a view) or repeat_kv copies k and v to every query head
            rows, made = q, []
            if kv != heads and ("mask" in extras or dim > 256):
                if q == 1:
                    rows = heads // kv
                else:
                    made = [new(b * heads * k * dim, width).tid for _ in "kv"]
            if "mask" in extras:
                made.append(new(b * q * k, width).tid)
            out = new(b * q * heads * dim, width)
            ledger.drop(ledger.new(b * heads * q * 4, "transient"))  # the log-sum-exp of each row, fp32
            if p.device == "cpu":  # per-thread blocks, then (bf16) its packed keys and values, alive together
                given = heads if len(made) > ("mask" in extras) else kv  # (repeat_kv's copies, or the cache's heads)
                release([ledger.new(size, "transient") for size in [flash_scratch(rows, k, dim, width, p.threads),
                         *flash_packs(b, given, q, k, dim, p.dtype, p.threads)]], ledger)
            release(made, ledger)
            return out  # written as [b, q, heads, d]: merging the heads is a view
        held = []  # what the attention's locals hold until it returns
        if core.get("fused_qkv") and b > 1 and q > 1:  # q out of the fused projection: reshape copies it
            held.append(new(b * q * heads * dim, width).tid)
        # repeat_kv: keys and values copied to every query head, eager_attention_forward's locals (freed as it returns)
        copies = [new(b * heads * k * dim, width).tid for _ in "kv"] if kv != heads else []
        scores = new(b * heads * q * k, width)  # q @ k^T (BLOOM: baddbmm onto ALiBi)
        self.scratch(q, dim, k, batch=b * heads)
        for role in masks.ROLES:
            if role in extras:
                added = new(scores.elements, max(scores.width, extras[role].width))
                (held.append(scores.tid) if core.get("scores_held") else ledger.drop(scores.tid))
                scores = added
        upcast = None
        if core.get("softmax_fp32") and scores.width != 4 and p.device == "cpu":  # (CUDA: in the kernel)
            upcast = new(scores.elements, 4)  # softmax(x, dtype=float32): x.to(float32), then the softmax
        probs = new(scores.elements, 4 if core.get("softmax_fp32") else scores.width)
        if upcast is not None:
            ledger.drop(upcast.tid)
        (held.append(scores.tid) if core.get("scores_held") else ledger.drop(scores.tid))
        back = width if core.get("softmax_cast_back") else probs.width
        if probs.width != back:  # (the softmax's own output is a temporary)
            cast = new(probs.elements, back)
            ledger.drop(probs.tid)
            probs = cast
        context = new(b * heads * q * dim, width)  # probs @ v
        self.scratch(q, k, dim, batch=b * heads)
        out = new(b * q * heads * dim, width)  # heads merged back: a contiguous copy
        ledger.drop(context.tid)
        release(copies, ledger)
        # the attention weights it returns: the layer holds them until it returns, or (BLOOM) the model until the
        # next layer returns
        (self.returned if core.get("weights_held") == "next block" else self.block).append(probs.tid)
        self.scope.extend(held)  # freed when the attention returns (the flow's next "|")
        return out


    def experts(self, name: str, x: Value) -> Value:
        """A mixture of experts (Mixtral's), replayed by ``paramcalc.moe`` over b x q tokens with nothing needing a
        gradient and no weight training: no autograd node keeps anything, and what it makes dies as in eval."""
        from types import SimpleNamespace

        from . import moe
        from .ledger import Record

        combine = name.endswith(" combine")  # the picks summed over each token's K (an op of its own)
        spec = moe.spec_of(self.family, name.removesuffix(" combine"))
        modules = {row: replace(self.modules[row], weight_trains=False, lora_rank=0, lora_params={})
                   for row in (spec["router"], spec["experts"])}
        ctx = SimpleNamespace(values=self.values, modules=modules, grads={}, layer=self.layer, master=self.p.width,
                              compute=self.p.width, autocast=False, stop=False, checkpointed=False)
        new = lambda elements, width, grad=False: self.new(elements, width)  # noqa: E731 (nothing needs a gradient)
        record = Record([], None, [], [], [])
        if combine:
            return moe.combine(spec, x, self.ledger, ctx, new, record)
        return moe.replay(spec, x, self.ledger, ctx, new, record, [])

    def _makes(self, spec: dict) -> bool:
        """Whether the model makes a forward tensor this pass: a sliding-window mask for sdpa only once the keys
        reach the window (below it sdpa is told is_causal; masking_utils._ignore_causal_mask_sdpa)."""
        if spec["made"] == "sliding":
            return self.window is not None and visible(self.window, self.p.past) + self.p.tokens >= self.window
        return spec["made"] in MADE

    def _make(self, spec: dict) -> Value:
        """A forward tensor over the keys the layers see (a window's worth, once the cache slides)."""
        keys = self.p.tokens + (self.p.past if self.window is None else visible(self.window, self.p.past))
        elements = _made_elements(spec, self.values, replace(self.p, past=keys - self.p.tokens))
        if spec["dtype"] != "bool":
            return self.new(elements, self.p.width)
        # the sliding mask: causal and within the window, each a q x k boolean and'ed in (three at once at its widest)
        self.ledger.drop(self.ledger.new(2 * elements, "transient"))
        return self.new(elements, 1)

    def _update(self, entry: tuple[int | None, list[int]], per_position: int) -> int:
        """``cache.update`` of one layer: torch.cat(cached, new) for the keys, then the values, each a new tensor; a
        full layer frees its old keys once the new keys exist, a sliding one its old keys and values once both new
        ones do. The old tensors turn transient as the new ones are made; returns the keys the kernel attends to."""
        window, tids = entry
        p, ledger = self.p, self.ledger
        old = []
        for tid in tids:
            size = ledger.size[tid][0]
            ledger.drop(tid)
            old.append(ledger.new(size, "transient"))
        keys = visible(window, p.past) + p.tokens
        tids[:] = []
        for i in range(2):
            tids.append(ledger.new(per_position * keys, "kv_cache"))
            if window is None and old:
                ledger.drop(old[i])
        if window is not None:
            release(old, ledger)
        return keys


def _made_elements(spec: dict, values: dict, p: Pass) -> int:
    """A forward tensor's elements for q new positions over k keys; the family file writes them for a training step
    (q = k = s). A quadratic mask (``b*s*s``: the causal mask, b x 1 x q x k) is q x k, any other mask (ALiBi,
    b*heads x 1 x k) k; rotary tables (cos and sin, 1 x s x D in training) are b x q x D: generate passes
    position ids per sequence."""
    text = spec["elements"].replace(" ", "")
    if spec["made"] == "rotary":
        return p.batch * expr.evaluate(text, {**values, "s": p.tokens})
    elements = expr.evaluate(text, {**values, "s": p.keys})
    return elements // p.keys * p.tokens if "s*s" in text else elements

