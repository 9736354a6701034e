"""Read a family file (``formulas/<family>.toml``) into one merged table: follow its ``extends`` chain,
merge each child into its parent (tables key by key, ``drop_parts``/``drop_modules``, same-name module swaps) and
spell out the ``[flow_pieces]`` its flow names. :mod:`paramcalc.families` turns the table into a ``Family``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path


def _read(path: Path) -> tuple[dict, bytes]:
    """A family file's table with what it extends merged in (RoBERTa reuses BERT's encoder and swaps its heads;
    Mixtral extends Mistral, which extends Llama), and the text of every file it was made from."""
    text = path.read_bytes()
    raw = tomllib.loads(text.decode())
    if "extends" in raw:
        parent, parent_text = _read(path.with_name(f"{raw['extends']}.toml"))
        raw, text = _inherit(parent, raw), text + parent_text
    return raw, text


PIECE = "@"  # in a [flow] part: "@NAME" stands for the ops of [flow_pieces] NAME


def _expand(path: Path, flow: dict, pieces: dict) -> dict:
    """A part's flow with its pieces spelled out. A piece is a named run of ops (Llama's self-attention and
    feed-forward sub-layers) that a child file can replace alone, keeping the rest of its parent's flow: Mixtral
    swaps only the feed-forward piece for its mixture of experts. Any family may use pieces; one level, no nesting."""
    expanded = {}
    for part, ops in flow.items():
        expanded[part] = []
        for op in ops:
            if not op.startswith(PIECE):
                expanded[part].append(op)
            elif op[1:] in pieces:
                expanded[part].extend(pieces[op[1:]])
            else:
                raise ValueError(f"{path.name}: flow {part!r} names piece {op!r}, which [flow_pieces] lacks")
    return expanded


def _inherit(parent: dict, child: dict) -> dict:
    """Child keys win; tables merge key by key; lists (buffers, attention cores, adapter sites) are the
    child's when it gives them. Modules: the parent's, less those of the parts the child drops (``drop_parts``)
    and those it names in ``drop_modules``; a child module with a parent module's name takes its place (Qwen2
    swaps Llama's Q/K/V for biased ones), any other is added. The flow is the parent's unless the child drops a
    module the flow still runs (a part the child does not write, or a ``[flow_pieces]`` piece it does not replace):
    then the child has no flow at all and its steps are traced. Pieces merge by name like the other tables, so a
    child replaces one sub-layer of its parent's flow (Mixtral's feed-forward piece runs its routed experts in
    place of Llama's SwiGLU)."""
    merged = {**parent, **child}
    for table in ("symbols", "defaults", "fixed", "derived_defaults", "key_aliases", "unsupported", "peft", "tokens", "flow",
                  "flow_pieces"):
        merged[table] = {**parent.get(table, {}), **child.get(table, {})}
    dropped, gone = set(child.get("drop_parts", [])), set(child.get("drop_modules", []))
    flow = _expand(Path(f"{child.get('family', '')}.toml"), merged["flow"], merged["flow_pieces"])
    if any(op.partition(":")[2].strip().removesuffix(" [tied]") in gone for ops in flow.values() for op in ops):
        merged["flow"] = {}
    swaps: dict[str, list] = {}  # name -> the child's modules of that name (one per condition)
    for m in child.get("modules", []):
        swaps.setdefault(m["name"], []).append(m)
    modules, placed = [], set()
    for m in parent["modules"]:
        if m["part"] in dropped or m["name"] in gone:
            continue
        if m["name"] not in swaps:
            modules.append(m)
        elif m["name"] not in placed:  # the child's modules of that name, where the parent's first one was
            modules.extend(swaps[m["name"]])
            placed.add(m["name"])
    for m in child.get("modules", []):  # a new module goes after the last of its part (Mixtral's experts)
        if m["name"] not in placed:
            last = max((i for i, kept in enumerate(modules) if kept["part"] == m["part"]), default=len(modules) - 1)
            modules.insert(last + 1, m)
    merged["modules"] = modules
    return merged
