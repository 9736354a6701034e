"""Memory of a training step, analytically: the model states first.

Weights, gradients and optimizer state follow from the parameter counts and the step's precision:

- weights: every parameter at the step's dtype (fp32 master weights under mixed precision), plus the
  model's buffers; what ``from_pretrained`` keeps in fp32 when it loads in half precision stays fp32 (the
  family file's ``[keep_fp32]``: T5's ``wo`` in fp16; ``parameter_dtype``);
- gradients: one per trainable parameter, in the parameter's dtype;
- optimizer state, per trainable parameter (torch.optim and the cited libraries): Adam/AdamW two
  moments (exp_avg, exp_avg_sq) in the parameter's dtype plus a 4-byte ``step`` per parameter tensor;
  SGD with momentum one buffer; plain SGD none; 8-bit AdamW (bitsandbytes) two 1-byte moments; Adafactor
  (Shazeer & Stern 2018, arXiv:1804.04235) factored second moments, a row and a column vector per matrix.
- optimizer transient: torch's single-tensor Adam/AdamW builds two temporaries the size of the
  parameter it updates, so the largest trainable tensor sets it.
- quantized weights (``--quant``, bitsandbytes as transformers loads it): each quantized weight at the
  bytes it is stored in (``quant.weight_bytes``: packed values, absmax, codes; int8 values and row
  scales), the other parameters in the ``dtype=`` they were loaded in. A 4-bit module's first forward
  casts its bias to the compute dtype for good (``Linear4bit.forward``: ``bias.data = bias.data.to(x.dtype)``).

Activations and the other transient peaks are the next layer of this model (not here yet).
"""

from __future__ import annotations

from dataclasses import dataclass

import math

from . import expr
from .errors import ParamcalcError
from .families import concrete_parameters, families, numel
from .step import Step

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
STEP_COUNTER_BYTES = 4  # torch.optim Adam/AdamW keep `step` as a float32 scalar tensor per parameter


@dataclass
class ModelStates:
    weights: int
    gradients: int
    optimizer: int
    optimizer_transient: int

    def to_dict(self) -> dict:
        return {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer,
                "optimizer_transient": self.optimizer_transient}


def weights_dtype(result, step: Step) -> str:
    """The dtype the model's (unquantized) parameters have: the step's, or the one ``--quant`` loads them in."""
    if result.quant is None:
        return step.dtype
    loaded = result.quant.options.dtype
    if step.dtype not in ("fp32", loaded):
        raise ParamcalcError(f"--dtype {step.dtype} and --quant dtype={loaded} disagree: a quantized model's other "
                             f"weights have the dtype it was loaded in; give it once, as --quant ...,dtype={step.dtype}")
    return loaded


def parameter_dtype(component, parameter: str, dtype: str, family) -> str:
    """The dtype one parameter (``parameter``: its full name; quantized weights aside) has in a model loaded
    in ``dtype``, PEFT applied. The one rule for bytes as stored: ``quant.apply`` and ``parameter_tensors``
    both read it.

    - peft keeps the weights it adds in fp32 even on a half-precision model (``get_peft_model``'s
      ``autocast_adapter_dtype=True``); the trainable copies of saved modules keep the module's dtype;
    - every other parameter as ``from_pretrained(..., dtype=dtype)`` loads it (``Family.loaded_dtype``): the
      dtype asked for, except what the family file's ``[keep_fp32]`` keeps in fp32 (T5's ``wo`` in fp16).
      ``family`` None (a model without a family file): the dtype asked for.
    """
    if component.group == "peft" and "modules_to_save" not in component.name:
        return "fp32"
    return family.loaded_dtype(parameter, dtype) if family is not None else dtype


def parameter_tensors(result, dtype: str) -> list[tuple[str, int, bool, int]]:
    """(name, numel, trainable, bytes as stored) for every parameter tensor of the model loaded in ``dtype``.

    Each parameter in its ``parameter_dtype``. Quantized weights (never trainable) take the bytes
    bitsandbytes stores for them; a 4-bit module's bias the compute dtype its first forward casts it to.
    """
    from . import quant

    values = result.values
    family = None if result.generic else families()[result.family]
    quantized = set(result.quant.quantized) if result.quant else set()
    options = result.quant.options if result.quant else None
    tensors = []
    for component in result.components:
        module_quantized = component.name in quantized or f"{component.name.removesuffix(' bias')} weight" in quantized
        for name, shape in concrete_parameters(component, values).items():
            elements = math.prod(shape)
            if module_quantized and name.endswith(".weight"):
                rows = expr.evaluate(component.args["out_features"], values)
                nbytes = quant.weight_bytes(elements, rows, options)
            elif module_quantized and options.type != "int8":  # the bias, cast to the compute dtype
                nbytes = elements * DTYPE_BYTES[options.compute_dtype]
            else:
                nbytes = elements * DTYPE_BYTES[parameter_dtype(component, name, dtype, family)]
            tensors.append((name, elements, component.trainable, nbytes))
    return tensors


def buffer_bytes(result) -> int:
    family = families()[result.family]
    parts = family.tasks[result.task].parts
    total = 0
    for buffer in family.buffers:
        if buffer["part"] in parts:
            total += numel(buffer["shape"], result.values) * buffer["bytes"]
    return total


def model_states(result, step: Step, kind: str = "cpu") -> ModelStates:
    """Weights, gradients and optimizer state of ``step`` on a device ``kind`` (cpu or cuda: torch's optimizers
    update a GPU's tensors differently)."""
    tensors = parameter_tensors(result, weights_dtype(result, step))  # mixed precision keeps fp32 parameters
    trainable = [(numel, nbytes // max(numel, 1)) for _, numel, train, nbytes in tensors if train]
    weights = sum(nbytes for *_, nbytes in tensors) + buffer_bytes(result)
    gradients = sum(numel * size for numel, size in trainable)  # a gradient has its parameter's dtype
    optimizer, transient = _optimizer_bytes(step.optimizer, trainable, result, kind)
    return ModelStates(weights, gradients, optimizer, transient)


def _optimizer_bytes(name: str, trainable: list[tuple[int, int]], result, kind: str = "cpu") -> tuple[int, int]:
    """(state bytes, transient bytes of the update) for (numel, bytes per element) trainable tensors."""
    state = sum(numel * size for numel, size in trainable)
    largest = max((numel * size for numel, size in trainable), default=0)
    if name in ("adamw", "adam") and kind == "cuda":
        # torch picks the foreach implementation for CUDA tensors (torch/optim/adam.py, _multi_tensor_adam):
        # torch._foreach_sqrt(exp_avg_sqs) makes the denominators of every tensor at once, one state-sized list;
        # its step counters stay on the CPU (they are device tensors only when capturable or fused)
        return 2 * state, state
    if name in ("adamw", "adam"):  # exp_avg + exp_avg_sq, a step counter per tensor; one tensor updated at a time
        return 2 * state + STEP_COUNTER_BYTES * len(trainable), 2 * largest
    if name == "sgd-momentum":  # one momentum buffer
        return state, 0
    if name == "sgd":
        return 0, 0
    if name == "adamw-8bit":  # bitsandbytes: two uint8 moments + an fp32 absmax per 2048-value block
        blocks = sum(-(-numel // 2048) for numel, _ in trainable)
        return 2 * sum(numel for numel, _ in trainable) + 2 * 4 * blocks, 0
    if name == "adafactor":  # a row and a column second-moment vector per matrix, a full one per vector
        return _adafactor(result), 0
    raise ValueError(name)


def _adafactor(result) -> int:
    total = 0
    for component in result.components:
        if component.trainable:
            for shape in concrete_parameters(component, result.values).values():
                total += (shape[0] + shape[1] if len(shape) == 2 else shape[0]) * 4  # fp32 factors
    return total
