"""Batches for ``paramcalc train``: synthetic tokens by default, or examples read from ``--data FILE``.

Every batch has exactly the requested shape, ``[batch, seq]`` (``[batch, tgt_seq]`` for T5 targets), so
memory and time never depend on the data; only the loss does.

**Synthetic** (no ``--data``): seeded random token ids that avoid the model's special ids (pad, bos, eos...)
and labels valid for the task. No attention_mask (nothing is padded). By default every step gets the same
batch (``pool=1``), so the loss falls as the model memorises it; ``pool=N`` cycles N distinct batches.

**Files**, read whole, in file order, cycled when the steps need more:
  ``.jsonl``  one JSON object per line: ``{"text": "...", "label": ..., "target": "..."}``
  ``.csv``    a header naming a ``text`` column (``label``, ``target`` optional)
  ``.txt``    one example per non-empty line (no labels)
``label`` is read by seq-cls (integers 0..num_labels-1, or strings numbered in order of first appearance;
numbers for regression, num_labels = 1) and by token-cls as a list with one label per token id. ``target``
is the seq2seq-lm target; without it the text is both source and target.

How rows are made: causal-lm, masked-lm and base (not T5) **pack** the examples, as Hugging Face's
run_clm/run_mlm do: each example's ids (plus a separator) are concatenated into one stream and cut into
``seq``-token rows, wrapping round at the end; nothing is padded, labels are the input ids (masked-lm
reconstructs every token, no [MASK] corruption). seq-cls, token-cls, seq2seq-lm and T5's base model take
**one example per row**: truncated to ``seq`` (keeping the start), right-padded with ``pad_token_id``,
``attention_mask`` 0 there and labels -100 there (every such batch has an attention_mask, padded or not).
T5 seq-cls rows end with exactly one eos (the model reads the eos position). token-cls without list labels
gets ``label = token id % num_labels`` (a rule the model can learn). With prompt tuning or p-tuning, token-cls
and masked-lm labels get -100 for the virtual tokens peft prepends (peft leaves those two as given).

**Token ids**: ``--tokenizer DIR`` loads a local tokenizer (``AutoTokenizer.from_pretrained(DIR,
local_files_only=True)``, or a ``tokenizers`` ``tokenizer.json``), with its special tokens; it pads with its
own pad token, else with the model's pad id (the config's pad, else its eos, else 0). Without one, a
**byte-level fallback** needs no files: each UTF-8 byte ``b`` becomes id ``b + 4`` (ids 4..259; 0..3 are the
pad/bos/eos/unk ids of BERT, RoBERTa, T5 and BLOOM), examples packed with a newline byte (id 14) between
them; the model needs vocab_size >= 260. Ids the model's embedding does not have are refused.

``batches.fill_config(hf_config)`` gives the model's config the pad id where it has none (GPT-2/BLOOM seq-cls
find each row's last token by it) and T5 its ``decoder_start_token_id`` (the pad id) to shift labels.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

from .errors import ParamcalcError

BYTE_OFFSET = 4  # byte b -> id b + 4; ids 0..3 are left to the usual pad/bos/eos/unk
SPECIAL_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id", "cls_token_id",
                "mask_token_id", "decoder_start_token_id")
PROMPT_METHODS = ("prompt", "ptuning")  # peft prepends their virtual tokens to the sequence


def model_ids(result) -> tuple[int, int, int | None, list[int]]:
    """(vocab_size, pad id, eos id or None, sorted special ids) of ``result``'s model, with transformers'
    config defaults filled in. Pad is the config's pad, else its eos (GPT-2's convention), else 0."""
    from .meta import hf_config

    hf = hf_config(result.config)
    vocab = int(hf.vocab_size)
    valid = [i for i in (getattr(hf, key, None) for key in SPECIAL_KEYS) if isinstance(i, int) and 0 <= i < vocab]
    pad = next((i for i in (getattr(hf, "pad_token_id", None), getattr(hf, "eos_token_id", None))
                if isinstance(i, int) and 0 <= i < vocab), 0)
    eos = getattr(hf, "eos_token_id", None)
    return vocab, pad, eos if isinstance(eos, int) and 0 <= eos < vocab else None, sorted({*valid, pad})


def virtual_tokens(result) -> int:
    return sum(options.tokens for method, options in result.peft_options if method in PROMPT_METHODS)


def _prepend_virtual(labels, virtual: int, result):
    """-100 for the virtual tokens peft prepends: it pads causal-lm labels itself and seq-cls has one label
    per row, but token-cls and masked-lm labels it leaves as given, one short per virtual token."""
    import torch

    if not virtual or result.task not in ("token-cls", "masked-lm"):
        return labels
    return torch.cat([torch.full((labels.shape[0], virtual), -100, dtype=labels.dtype), labels], dim=1)


def synthetic_inputs(result, batch: int, seq: int, tgt_seq: int | None = None, generator=None,
                     prompt_tokens: int | None = None) -> dict:
    """One synthetic batch for ``result``'s task, as keyword arguments of ``model(**inputs)``.

    Torch ops only, so it also runs under FakeTensorMode. Token ids avoid the model's special ids.
    """
    import torch

    vocab, _pad, eos, specials = model_ids(result)
    specials = specials if vocab - len(specials) > 1 else []
    t = tgt_seq or seq
    virtual = virtual_tokens(result) if prompt_tokens is None else prompt_tokens

    def tokens(*shape):
        ids = torch.randint(0, vocab - len(specials), shape, generator=generator)
        for special in specials:  # the r-th id that is not special: step over each special at or below it
            ids = ids + (ids >= special).long()
        return ids

    ids = tokens(batch, seq)
    task, labels = result.task, result.config.get("num_labels", 2)
    if task == "seq2seq-lm":
        return {"input_ids": ids, "labels": tokens(batch, t)}
    if task == "base" and result.family == "t5":
        return {"input_ids": ids, "decoder_input_ids": tokens(batch, t)}
    if task in ("causal-lm", "masked-lm"):
        return {"input_ids": ids, "labels": _prepend_virtual(ids.clone(), virtual, result)}
    if task == "seq-cls":
        if result.family == "t5" and eos is not None:
            ids[:, -1] = eos  # T5ForSequenceClassification reads the hidden state at the (single) eos
        if labels == 1:
            return {"input_ids": ids, "labels": torch.randn(batch, generator=generator)}  # regression
        return {"input_ids": ids, "labels": torch.randint(0, labels, (batch,), generator=generator)}
    if task == "token-cls":
        target = torch.randint(0, labels, (batch, seq), generator=generator)
        return {"input_ids": ids, "labels": _prepend_virtual(target, virtual, result)}
    return {"input_ids": ids}


@dataclass
class Batches:
    """``next()`` gives the next batch: a dict of CPU tensors for ``model(**batch)``."""

    task: str
    family: str
    batch: int
    seq: int
    tgt_seq: int | None
    pad_token_id: int  # the id padding uses; give it to the model where its config has none
    source: str  # "synthetic", or "FILE (N examples, tokenizer DIR | byte-level)"
    examples: int = 0
    label_ids: dict = field(default_factory=dict)  # label as written in the file -> class id
    step: int = 0
    _make: object = field(default=None, repr=False)

    def fill_config(self, hf_config) -> None:
        """Give a transformers config the ids these batches rely on, where it has none."""
        if getattr(hf_config, "pad_token_id", None) is None:
            hf_config.pad_token_id = self.pad_token_id
        if self.family == "t5" and getattr(hf_config, "decoder_start_token_id", None) is None:
            hf_config.decoder_start_token_id = hf_config.pad_token_id

    def next(self) -> dict:
        batch = self._make(self.step)
        self.step += 1
        return batch

    def __iter__(self):
        return self

    __next__ = next


def make_batches(result, batch: int, seq: int, tgt_seq: int | None = None, data=None, tokenizer=None,
                 seed: int = 0, prompt_tokens: int | None = None, pool: int = 1) -> Batches:
    """Batches for ``result``'s model and task: synthetic, or read from ``data`` (see the module docstring).

    ``seed`` and ``pool`` shape synthetic batches (files are read in order); ``prompt_tokens`` defaults to the
    virtual tokens of ``result``'s prompt-tuning / p-tuning methods. Checks ``seq`` against the model first.
    """
    import torch

    from .step import Step, check_fits_model

    check_fits_model(Step(batch=batch, seq=seq, tgt_seq=tgt_seq), result)
    virtual = virtual_tokens(result) if prompt_tokens is None else prompt_tokens
    vocab, pad, eos, _ = model_ids(result)
    if data is None:
        if tokenizer is not None:
            raise ParamcalcError("--tokenizer tokenises --data; give --data FILE too, or leave --tokenizer out")
        generator = torch.Generator().manual_seed(seed)
        made = [synthetic_inputs(result, batch, seq, tgt_seq, generator, virtual) for _ in range(max(1, pool))]
        return Batches(result.task, result.family, batch, seq, tgt_seq, pad, "synthetic",
                       _make=lambda k: {key: v.clone() for key, v in made[k % len(made)].items()})
    examples = read_examples(data)
    encode, pad, eos, sep, name = _encoder(tokenizer, vocab, pad, eos)
    ids = encode([e["text"] for e in examples])
    packed = result.task in ("causal-lm", "masked-lm") or (result.task == "base" and result.family != "t5")
    targets = encode([e.get("target", e["text"]) for e in examples]) if result.task == "seq2seq-lm" or (
        result.task == "base" and not packed) else None
    top = max((max(row) for row in [*ids, *(targets or [])] if row), default=0)
    if top >= vocab:
        raise ParamcalcError(f"--tokenizer {tokenizer} gives token id {top}, but the model's vocab_size is {vocab}: "
                             f"the tokenizer does not match the model (use the model's own tokenizer, or "
                             f"--set vocab_size={top + 1})")
    out = Batches(result.task, result.family, batch, seq, tgt_seq, pad,
                  f"{data} ({len(examples)} examples, {name})", len(examples))
    if packed:
        ends = [[sep] if sep is not None and (not row or row[-1] != sep) else [] for row in ids]
        stream = torch.tensor([i for row, end in zip(ids, ends) for i in (*row, *end)], dtype=torch.long)
        if len(stream) == 0:
            raise ParamcalcError(f"--data {data}: the examples give no tokens")
        out._make = _packed(stream, result, batch, seq, virtual)
        return out
    labels = None
    if result.task == "seq-cls":
        labels = _class_labels(result, examples, data, out.label_ids)
        if result.family == "t5":  # T5ForSequenceClassification reads the hidden state at each row's one eos
            ids = [[i for i in row if i != eos][:seq - 1] + [eos] for row in ids]
    elif result.task == "token-cls":
        labels = _token_labels(result, examples, ids, data)
    out._make = _rows(ids, labels, targets, result, batch, seq, tgt_seq or seq, pad, virtual)
    return out


def _packed(stream, result, batch: int, seq: int, virtual: int):
    """Batch k is the stream's next batch*seq tokens, wrapping round at its end."""
    import torch

    positions = torch.arange(batch * seq).view(batch, seq)

    def make(k):
        rows = stream[(positions + k * batch * seq) % len(stream)]
        if result.task == "base":
            return {"input_ids": rows}
        return {"input_ids": rows, "labels": _prepend_virtual(rows.clone(), virtual, result)}
    return make


def _rows(ids, labels, targets, result, batch: int, seq: int, t: int, pad: int, virtual: int):
    """Batch k holds examples k*batch ... k*batch + batch - 1 (modulo their number), one per row."""
    import torch

    def table(source, picked, length, fill):
        out = torch.full((len(picked), length), fill, dtype=torch.long)
        for r, i in enumerate(picked):
            row = source[i][:length]
            out[r, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def make(k):
        picked = [(k * batch + r) % len(ids) for r in range(batch)]
        lengths = torch.tensor([min(len(ids[i]), seq) for i in picked])
        made = {"input_ids": table(ids, picked, seq, pad),
                "attention_mask": (torch.arange(seq) < lengths[:, None]).long()}
        if result.task == "seq-cls":
            made["labels"] = labels[picked]
        elif result.task == "token-cls":
            made["labels"] = _prepend_virtual(table(labels, picked, seq, -100), virtual, result)
        elif result.task == "seq2seq-lm":
            made["labels"] = table(targets, picked, t, -100)
        elif targets is not None:  # T5's bare model: the decoder reads the target shifted right by one
            made["decoder_input_ids"] = torch.cat([torch.full((batch, 1), pad), table(targets, picked, t - 1, pad)], 1)
        return made
    return make


def read_examples(path) -> list[dict]:
    """The examples of a .jsonl, .csv or .txt file, as dicts with ``text`` (and ``label``/``target`` if given)
    and ``line``, the line they start on."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".csv", ".txt"):
        raise ParamcalcError(f"--data {path}: unknown file type {ext or '(no extension)'!r}; use .jsonl (a JSON "
                             "object with \"text\" per line), .csv (a \"text\" column) or .txt (one example a line)")
    if not os.path.exists(path):
        raise ParamcalcError(f"--data {path}: no such file")
    if os.path.isdir(path):
        raise ParamcalcError(f"--data {path}: is a directory; give a .jsonl, .csv or .txt file")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise ParamcalcError(f"--data {path}: not UTF-8 text (undecodable byte at offset {exc.start})") from None
    except OSError as exc:
        raise ParamcalcError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # not splitlines(): JSON may hold U+2028
    if ext == ".txt":
        examples = [{"text": line, "line": n} for n, line in enumerate(lines, 1) if line.strip()]
    elif ext == ".jsonl":
        examples = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ParamcalcError(f"--data {path} line {n}: not valid JSON ({exc.msg})") from None
            if not isinstance(item, dict):
                raise ParamcalcError(f"--data {path} line {n}: each line must be a JSON object like "
                                     f"{{\"text\": \"...\"}}, got {type(item).__name__}")
            examples.append({**item, "line": n})
    else:
        try:
            reader = csv.DictReader(io.StringIO(text))  # quoted fields may span lines
            if reader.fieldnames is not None and "text" not in reader.fieldnames:
                raise ParamcalcError(f"--data {path}: the CSV header has no \"text\" column (it has: "
                                     f"{', '.join(reader.fieldnames)})")
            examples = [{**{k: v for k, v in row.items() if k is not None and v is not None}, "line": reader.line_num}
                        for row in reader]
        except csv.Error as exc:
            raise ParamcalcError(f"--data {path}: not readable as CSV ({exc})") from None
    for example in examples:
        for key in ("text", "target"):
            if key == "text" and key not in example:
                raise ParamcalcError(f"--data {path} line {example['line']}: no \"text\" field")
            if key in example and (not isinstance(example[key], str) or not example[key].strip()):
                raise ParamcalcError(f"--data {path} line {example['line']}: \"{key}\" must be non-empty text")
    if not examples:
        raise ParamcalcError(f"--data {path}: no examples in it")
    return examples


def _encoder(tokenizer, vocab: int, pad: int, eos: int | None):
    """(encode(texts) -> list of id lists, pad id, eos id, packing separator, name) for ``tokenizer``."""
    if tokenizer is None:
        if vocab < 256 + BYTE_OFFSET:
            raise ParamcalcError(f"the byte-level fallback (no --tokenizer) needs vocab_size >= "
                                 f"{256 + BYTE_OFFSET} (ids {BYTE_OFFSET}..{255 + BYTE_OFFSET}); this model has "
                                 f"{vocab}: give --tokenizer DIR")
        return (lambda texts: [[b + BYTE_OFFSET for b in t.encode("utf-8")] for t in texts],
                pad, eos, ord("\n") + BYTE_OFFSET, "byte-level")
    path = os.fspath(tokenizer)
    if not os.path.exists(path):
        raise ParamcalcError(f"--tokenizer {path}: no such directory or file")
    file = path if os.path.isfile(path) else os.path.join(path, "tokenizer.json")
    tok = None
    if os.path.isdir(path):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # OSError, ValueError, ... : transformers says why in its first line
            if not os.path.isfile(file):
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise ParamcalcError(f"--tokenizer {path}: cannot load a tokenizer from it ({first})") from None
    if tok is not None:
        t_pad, t_eos = tok.pad_token_id, tok.eos_token_id
        encode = lambda texts: tok(list(texts))["input_ids"]  # noqa: E731
    else:  # a tokenizer.json, read by the tokenizers library itself
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(file)
        except Exception as exc:
            raise ParamcalcError(f"--tokenizer {path}: cannot load {file} ({str(exc)[:200]})") from None
        t_pad = (tok.padding or {}).get("pad_id")
        named = [tok.token_to_id(s) for s in ("[PAD]", "<pad>", "</s>", "<|endoftext|>", "[EOS]", "<eos>")]
        t_pad = t_pad if t_pad is not None else next((i for i in named[:2] if i is not None), None)
        t_eos = next((i for i in named[2:] if i is not None), None)
        encode = lambda texts: [e.ids for e in tok.encode_batch(list(texts))]  # noqa: E731
    pad = t_pad if t_pad is not None and t_pad < vocab else pad
    sep = t_eos if t_eos is not None and t_eos < vocab else None  # packed examples end with the tokenizer's eos
    return encode, pad, sep if sep is not None else eos, sep, f"tokenizer {path}"


def _class_labels(result, examples, data, names: dict):
    """One class id (or regression value, num_labels = 1) per example, numbered as the docstring says."""
    import torch

    num = result.config.get("num_labels", 2)
    missing = next((e["line"] for e in examples if e.get("label") in (None, "")), None)
    if missing is not None:
        raise ParamcalcError(f"--data {data} line {missing}: seq-cls needs a \"label\" on every example "
                             "(a .jsonl field or a .csv column)")
    values = [e["label"] for e in examples]
    if num == 1:
        try:
            return torch.tensor([float(v) for v in values])
        except (TypeError, ValueError):
            raise ParamcalcError(f"--data {data}: num_labels = 1 is regression; every label must be a "
                                 "number") from None
    if all(type(v) is int or (isinstance(v, str) and v.strip().isdigit()) for v in values):  # class ids
        for example in examples:
            if not 0 <= int(example["label"]) < num:
                raise ParamcalcError(f"--data {data} line {example['line']}: label {example['label']} is out of "
                                     f"range for num_labels = {num} (0..{num - 1}); use --num-labels")
        return torch.tensor([int(v) for v in values])
    for v in values:
        names.setdefault(str(v), len(names))
    if len(names) > num:
        shown = ", ".join(list(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise ParamcalcError(f"--data {data}: {len(names)} distinct labels ({shown}) but the model has "
                             f"num_labels = {num}; use --num-labels {len(names)}")
    return torch.tensor([names[str(v)] for v in values])


def _token_labels(result, examples, ids, data) -> list[list[int]]:
    """Per-token labels: a list ``label`` as given (one per token id), else token id % num_labels."""
    num = result.config.get("num_labels", 2)
    out = []
    for example, row in zip(examples, ids):
        given = example.get("label")
        if isinstance(given, list):
            if not all(type(v) is int and (v == -100 or 0 <= v < num) for v in given):
                raise ParamcalcError(f"--data {data} line {example['line']}: token-cls labels must be integers "
                                     f"0..{num - 1} (or -100 to skip a token)")
            out.append(given)
        else:
            out.append([i % num for i in row])
    return out
