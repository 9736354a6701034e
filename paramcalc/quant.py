"""Quantized weights (bitsandbytes, as transformers loads them): bytes per component, and the
parameter counts people see printed for a quantized model.

The real parameter count does not change. What changes:

- storage: a 4-bit weight (nf4/fp4) packs two values per byte and keeps one absmax per block of 64
  (fp32; with double_quant a uint8 per block plus a second-level fp32 per 256 blocks, its 256-entry
  code and an offset), plus its 16-entry fp32 code; an int8 weight keeps one byte per value and an
  fp32 scale per output row (LLM.int8, Dettmers et al. 2022, arXiv:2208.07339; QLoRA, Dettmers et al.
  2023, arXiv:2305.14314);
- printed counts: a 4-bit weight is stored as a uint8 tensor of ceil(n/2) elements, so
  ``sum(p.numel() for p in model.parameters())`` shows about half of each quantized weight; peft's
  ``print_trainable_parameters`` multiplies those by 2, which gives the real count (one more for a
  weight with an odd number of elements).

Which modules transformers quantizes (``quantizers/base.py: get_keys_to_not_convert``): every Linear and
Conv1D except the output embedding, tied weights, the module of the model's last parameter when that
parameter is a weight, and the model's ``_keep_in_fp32_modules`` (the family file's ``[keep_fp32] modules``:
T5's ``wo``), whatever the dtype.

The parameters left unquantized are stored in ``dtype=``, except what loading keeps in fp32: in fp16 the
``_keep_in_fp32_modules`` too (so T5's ``wo`` is an fp32 ``nn.Linear`` beside fp16 weights; in bf16 it is
bf16), and peft's adapters (``memory.parameter_dtype``, the rule the memory model reads as well).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from . import expr
from .errors import ParamcalcError
from .families import concrete_parameters, numel

TYPES = ("nf4", "fp4", "int8")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # torch.float32 / float16 / bfloat16 element sizes
BLOCK = 64  # bitsandbytes' 4-bit blocksize (Params4bit default)
NESTED_BLOCK = 256  # double quantization's second-level blocksize
CODE_4BIT = 16 * 4  # the 16-entry fp32 nf4/fp4 code of every quantized weight
CODE_NESTED = 256 * 4 + 4  # double quantization's 256-entry fp32 code and its fp32 offset


@dataclass
class Options:
    type: str = field(default="nf4", metadata={"help": "nf4 | fp4 | int8"})
    double_quant: bool = field(default=False, metadata={"help": "bnb_4bit_use_double_quant (QLoRA)"})
    dtype: str = field(default="fp32", metadata={"help": "dtype of the weights left unquantized: fp32|fp16|bf16"})
    # transformers' BitsAndBytesConfig default; QLoRA recipes set bnb_4bit_compute_dtype=torch.bfloat16
    compute_dtype: str = field(default="fp32", metadata={"help": "bnb_4bit_compute_dtype: fp32|fp16|bf16"})

    def __post_init__(self):
        self.type, self.dtype, self.compute_dtype = self.type.lower(), self.dtype.lower(), self.compute_dtype.lower()
        if self.type not in TYPES:
            raise ParamcalcError(f"--quant: type must be one of {', '.join(TYPES)}, got {self.type!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ParamcalcError(f"--quant: dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.compute_dtype not in DTYPE_BYTES:
            raise ParamcalcError(f"--quant: compute_dtype must be one of {', '.join(DTYPE_BYTES)}, "
                                 f"got {self.compute_dtype!r}")
        if self.type == "int8" and self.compute_dtype != "fp32":
            raise ParamcalcError("--quant: compute_dtype applies to nf4/fp4 (bnb_4bit_compute_dtype), not int8")
        if self.double_quant and self.type == "int8":
            raise ParamcalcError("--quant: double_quant applies to nf4/fp4, not int8")


def parse(spec: str) -> Options:
    """``nf4`` or ``nf4,double_quant=true,dtype=bf16``: a bare first item is the type."""
    from .tuners.spec import parse_spec

    spec = spec.strip()
    first, _, rest = spec.partition(",")
    if first and "=" not in first:
        spec = f"type={first}" + (f",{rest}" if rest else "")
    return parse_spec("--quant", spec, Options)


def weight_bytes(numel: int, rows: int, options: Options) -> int:
    """Bytes bitsandbytes stores for one quantized weight of ``numel`` values and ``rows`` output rows."""
    if options.type == "int8":
        return numel + 4 * rows  # int8 values + fp32 row scales (SCB)
    blocks = -(-numel // BLOCK)
    packed = -(-numel // 2)
    if options.double_quant:
        stats = blocks + 4 * -(-blocks // NESTED_BLOCK) + CODE_NESTED
    else:
        stats = 4 * blocks
    return packed + stats + CODE_4BIT


@dataclass
class QuantSummary:
    options: Options
    quantized: list[str]  # component names whose weights are quantized
    weight_bytes: int  # all parameters, quantized or not
    peft_print: tuple[int, int]  # (trainable, all) as peft's print_trainable_parameters shows them
    numel_sum: int  # sum(p.numel()) over the quantized model
    frozen: int = 0  # parameters in quantized weights (they never train)

    def to_dict(self) -> dict:
        return {**asdict(self.options), "quantized_components": self.quantized, "weight_bytes": self.weight_bytes,
                "peft_print": {"trainable": self.peft_print[0], "all": self.peft_print[1]},
                "numel_sum": self.numel_sum, "frozen_quantized_params": self.frozen}

    def explanation(self, total: int) -> str:
        frozen = (f"{self.frozen:,} parameters sit in {self.options.type} weights, which never train "
                  "(bitsandbytes loads them with requires_grad=False; biases and the unquantized modules keep "
                  "training unless PEFT freezes them); ")
        if self.options.type == "int8":
            return frozen + ("int8 weights keep one element per value, so printed counts equal the real count "
                             f"{total:,}")
        return frozen + (
            f"peft's print_trainable_parameters (and transformers' num_parameters) show all params: "
            f"{self.peft_print[1]:,}: they double each packed 4-bit tensor, one more than the real count for "
            "each odd-sized weight; "
            f"sum(p.numel()) over the quantized model shows {self.numel_sum:,}, because bitsandbytes stores "
            f"two 4-bit values per uint8 element; the real count is {total:,}")


def apply(result, options: Options, family) -> QuantSummary:
    """Size every component as stored, and freeze the quantized weights (a trainable bias of a quantized
    module gets a row of its own: transformers' loading leaves it trainable)."""
    from .memory import parameter_dtype
    from .tuners.common import split

    values = result.values
    base = [c for c in result.components if c.group != "peft"]
    last = next((c for c in reversed(base) if c.kind != "tied"), None)
    keep = set(family.keep_fp32)  # never quantized, in any dtype (bitsandbytes' quantizer skips them)
    quantized, rows, extra_print, packed_saving, total_bytes, frozen = [], [], 0, 0, 0, 0
    for component in result.components:
        per_numel = {s: numel(shape, values) for s, shape in component.shapes.items()}
        stored = {name: math.prod(shape) * DTYPE_BYTES[parameter_dtype(component, name, options.dtype, family)]
                  for name, shape in concrete_parameters(component, values).items()}
        component.weight_bytes = sum(stored.values())
        if not _quantizable(component, last, keep):
            total_bytes += component.weight_bytes
            rows.append(component)
            continue
        parts = split(component, {"bias"}, values) if component.trainable else [component]
        weight = parts[0]
        weight.trainable = False
        n = per_numel["weight"]
        bias = sum(nbytes for name, nbytes in stored.items() if name.endswith(".bias"))  # left unquantized
        weight.weight_bytes = component.repeat_count * weight_bytes(
            n, expr.evaluate(component.args["out_features"], values), options) + (bias if len(parts) == 1 else 0)
        if len(parts) == 2:  # the trainable bias's own row
            parts[1].weight_bytes = bias
        total_bytes += sum(part.weight_bytes for part in parts)
        rows.extend(parts)
        quantized.append(weight.name)
        frozen += component.repeat_count * n
        if options.type != "int8":
            extra_print += component.repeat_count * (2 * -(-n // 2) - n)
            packed_saving += component.repeat_count * (n - -(-n // 2))
    if not quantized:
        raise ParamcalcError("--quant: this model has no Linear or Conv1D weights that transformers would "
                             "quantize")
    result.components[:] = rows
    _refuse_trainable_copies(result, quantized)
    total, trainable = result.total_params, result.trainable_params
    return QuantSummary(options, quantized, total_bytes, (trainable, total + extra_print), total - packed_saving,
                        frozen)


def _refuse_trainable_copies(result, quantized: list[str]) -> None:
    """peft's modules_to_save copies a module to train it; a copy of a quantized one cannot train."""
    suffix = " (trainable copy, modules_to_save)"
    for component in result.components:
        original = component.name.removesuffix(suffix)
        if component.name.endswith(suffix) and original in quantized + [f"{original} weight"]:
            raise ParamcalcError(
                f"--quant: peft would train a copy of {original!r} (modules_to_save), but transformers quantizes "
                "that module and a bitsandbytes weight cannot require gradients (peft fails: 'only Tensors of "
                "floating point dtype can require gradients'); drop --quant or that module from modules_to_save")


def _quantizable(component, last, keep) -> bool:
    if component.group == "peft" or component.kind not in ("linear", "conv1d") or "weight" not in component.shapes:
        return False
    if component.role == "output-embedding":
        return False
    if component is last and "bias" not in component.shapes:  # the last parameter is this module's weight
        return False
    return not any(component.param == k or component.param.endswith(f".{k}") for k in keep)


def replay_matmul(module, x, grad_out: bool, bias_trains: bool, options: Options, ctx, ledger, new, save,
                  record):
    """The base matmul of a bitsandbytes module in a training step on the CPU, for the memory replay: the
    values it allocates (``new``, dropped from ``ledger`` when Python frees them), what it keeps (``save``)
    and what its backward holds (``record.scratch``, ``record.held``). Returns its output.

    ``Linear4bit`` (``Linear4bit.forward``, ``MatMul4Bit``, the ``gemm_4bit`` CPU kernel): the input is cast
    to the compute dtype; the whole weight is dequantized into it and ``linear`` runs (under autocast that
    casts weight and input to half precision first: a half copy of the weight beside the dequantized one);
    the output is cast back to the input's dtype, so under autocast an fp32 input gives an fp32 output. No
    activation is kept, only the packed weight: backward dequantizes it again, in the dtype it was loaded in,
    cast to the gradient's dtype. peft's 4-bit LoRA layer clones the base output.
    ``Linear8bitLt`` in training on a CPU (``MatMul8bitFp``): the weight is dequantized into the input's
    dtype and ``linear`` runs (autocast casts as for any Linear; the output keeps autocast's dtype); the
    input is kept for backward (``ctx.A``) whenever the op is recorded, needed or not; backward dequantizes
    into the input's dtype again and casts the gradient to it.
    """
    n, out_elements = module.fan_in * module.fan_out, module.tokens * module.fan_out
    if options.type == "int8":
        operand, width = x, x.width
    else:
        width = DTYPE_BYTES[options.compute_dtype]
        operand = new(x.elements, width, x.grad) if x.width != width else x
    weight = new(n, width, False)
    if ctx.autocast and width != ctx.compute:
        casts = [new(n, ctx.compute, False), new(x.elements, ctx.compute, False)]
        out = new(out_elements, ctx.compute, grad_out)
        for value in casts:
            ledger.drop(value.tid)
    else:
        out = new(out_elements, width, grad_out)
    ledger.drop(weight.tid)
    if options.type == "int8":
        if x.grad or bias_trains:
            save(x)
        if x.grad:
            record.held = n * x.width + (out_elements * x.width if out.width != x.width else 0)
        return out
    if x.grad:
        loaded = DTYPE_BYTES[options.dtype]
        record.scratch = n * loaded + (n * out.width if out.width != loaded else 0)
        record.held = n * out.width if out.width != loaded else 0
    if out.width != x.width:
        cast = new(out_elements, x.width, grad_out)
        ledger.drop(out.tid)
        out = cast
    if operand is not x:
        ledger.drop(operand.tid)
    if module.lora_rank:
        clone = new(out_elements, out.width, grad_out)
        ledger.drop(out.tid)
        out = clone
    return out
