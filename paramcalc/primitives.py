"""Typed primitives: the parameter-bearing building blocks every family composes.

Each primitive is a small pure function over *symbolic shapes* (strings such as
``"H"`` or ``"3*H"``) that returns the parameters it owns, by name, with their
shapes, exactly as the matching ``torch.nn`` module stores them. Counting,
formulas and verification are all derived from these shapes, so a primitive is
written once and never again by hand elsewhere.

One registry, filled only by the ``@primitive`` decorator, which refuses duplicates.
"""

from __future__ import annotations

from typing import Callable

Shape = tuple[str, ...]
ParamShapes = dict[str, Shape]  # parameter suffix ("weight", "bias") -> shape

PRIMITIVES: dict[str, Callable[..., ParamShapes]] = {}


def primitive(kind: str):
    """Register a primitive under ``kind`` (the ``kind =`` of a family file)."""

    def register(fn: Callable[..., ParamShapes]) -> Callable[..., ParamShapes]:
        if kind in PRIMITIVES:
            raise ValueError(f"primitive {kind!r} registered twice")
        PRIMITIVES[kind] = fn
        return fn

    return register


@primitive("linear")
def linear(in_features: str, out_features: str, bias: bool = True) -> ParamShapes:
    # nn.Linear: y = x @ W.T + b;  W: [out, in], b: [out]
    params = {"weight": (out_features, in_features)}
    if bias:
        params["bias"] = (out_features,)
    return params


@primitive("conv1d")
def conv1d(in_features: str, out_features: str, bias: bool = True) -> ParamShapes:
    # GPT-2's Conv1D is a linear layer with the weight stored transposed:
    # y = x @ W + b;  W: [in, out], b: [out]
    params = {"weight": (in_features, out_features)}
    if bias:
        params["bias"] = (out_features,)
    return params


@primitive("embedding")
def embedding(num_embeddings: str, embedding_dim: str) -> ParamShapes:
    # nn.Embedding: a lookup table, one row per id;  W: [num, dim]
    return {"weight": (num_embeddings, embedding_dim)}


@primitive("layernorm")
def layernorm(dim: str, bias: bool = True) -> ParamShapes:
    # nn.LayerNorm: gain and shift per feature;  weight: [dim], bias: [dim]
    params = {"weight": (dim,)}
    if bias:
        params["bias"] = (dim,)
    return params


@primitive("rmsnorm")
def rmsnorm(dim: str) -> ParamShapes:
    # RMSNorm (T5LayerNorm): scale only, no mean subtraction and no bias;  weight: [dim]
    return {"weight": (dim,)}


@primitive("vector")
def vector(size: str, name: str = "bias") -> ParamShapes:
    # A bare nn.Parameter vector, e.g. BERT's output bias kept outside its decoder
    return {name: (size,)}


@primitive("router")
def router(num_experts: str, hidden_size: str) -> ParamShapes:
    # A mixture-of-experts router (Mixtral's MixtralTopKRouter): one score per expert, no bias;  W: [E, hidden]
    return {"weight": (num_experts, hidden_size)}


@primitive("experts")
def experts(num_experts: str, hidden_size: str, intermediate_size: str) -> ParamShapes:
    # A mixture of SwiGLU experts stored fused, as transformers 5 builds them (MixtralExperts): every expert's
    # gate and up projections in one 3-D tensor, its down projections in another
    return {"gate_up_proj": (num_experts, f"2*{intermediate_size}", hidden_size),
            "down_proj": (num_experts, hidden_size, intermediate_size)}


@primitive("tied")
def tied(**_ignored) -> ParamShapes:
    # Shares its weight with another module: adds no parameters of its own
    # (torch counts a shared tensor once, in model.parameters()).
    return {}


@primitive("lstm")
def lstm(input_size: str, hidden_size: str, num_layers: int = 1, bidirectional: bool = False) -> ParamShapes:
    # nn.LSTM: per layer and direction, the 4 gates' input and hidden weights and two bias vectors;
    # layer 0 reads the input, later layers read the previous layer's (both directions') output.
    params = {}
    directions = ["", "_reverse"] if bidirectional else [""]
    for layer in range(int(num_layers)):
        layer_input = input_size if layer == 0 else f"{len(directions)}*({hidden_size})"
        for suffix in directions:
            params[f"weight_ih_l{layer}{suffix}"] = (f"4*({hidden_size})", layer_input)
            params[f"weight_hh_l{layer}{suffix}"] = (f"4*({hidden_size})", hidden_size)
            params[f"bias_ih_l{layer}{suffix}"] = (f"4*({hidden_size})",)
            params[f"bias_hh_l{layer}{suffix}"] = (f"4*({hidden_size})",)
    return params
