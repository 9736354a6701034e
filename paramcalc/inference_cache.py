"""What ``generate()`` picks from a model's config: the layers of its ``DynamicCache`` and its logits processors.

transformers 5.24 builds the cache from the config (``DynamicCache(config=...)``, ``cache_utils.
get_layer_types_and_kwargs``): a layer whose config has a ``sliding_window`` is a ``DynamicSlidingWindowLayer``,
any other a ``DynamicLayer``. The two grow differently (``cache_utils.py``):

- ``DynamicLayer.update``: ``self.keys = torch.cat([self.keys, key_states])``, then the same for the values. Each
  rebinding frees the old tensor before the values are concatenated, and the cache keeps every position.
- ``DynamicSlidingWindowLayer.update``: ``full_key_states = torch.cat([self.keys, key_states])``, ``full_value_states
  = torch.cat(...)``, then ``self.keys = full_key_states[:, :, -window + 1:]`` (and the values): the old keys and
  values are freed only once both new ones exist, the layer keeps a *view* of the last ``window - 1`` positions
  (the whole new tensor stays allocated), and the next step concatenates onto that view. So after the prefill the
  layer's storage is the prompt's length, and after each decode step ``min(cached positions, window - 1) + 1``.

Position ids are made only for a model whose forward takes them. ``generate`` adds ``MinLengthLogitsProcessor`` and ``MinNewTokensLengthLogitsProcessor`` (``min_new_tokens``) only
when the generation config has an end-of-sequence token (``generation/utils.py: _get_logits_processor``: both ask
for ``_eos_token_tensor``); without one the scores are the fp32 copy of the logits itself.

Torch-free: the analytic path.
"""

from __future__ import annotations

# The config classes' defaults (transformers 5.24, configuration_<model>.py) for the keys read here: a config that
# leaves a key out gets these. Mistral's 4,096-position window is on unless the config says null; Qwen2's window is
# off unless use_sliding_window, and then only from layer max_window_layers on (Qwen2Config.__post_init__).
CONFIG_DEFAULTS = {
    "gpt2": {"eos_token_id": 50256},
    "bloom": {"eos_token_id": 2},
    "llama": {"eos_token_id": 2},
    "mistral": {"eos_token_id": 2, "sliding_window": 4096},
    "qwen2": {"eos_token_id": None, "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28},
    "mixtral": {"eos_token_id": 2, "sliding_window": None},
}
PROCESSORS = 2  # what min_new_tokens turns on: MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor
# families whose causal LM's forward takes no position_ids (BloomForCausalLM: ALiBi), so generate makes none
NO_POSITION_IDS = {"bloom"}


def _config(result) -> dict:
    return {**CONFIG_DEFAULTS.get(result.config.get("model_type", result.family), {}), **result.config}


def processors(result) -> int:
    """The logits processors generate runs: two with an end-of-sequence token, none without."""
    return PROCESSORS if _config(result).get("eos_token_id") is not None else 0


def takes_positions(result) -> bool:
    """Whether generate makes position ids for the model (``_prepare_position_ids_for_generation``: when its forward
    takes them)."""
    return result.family not in NO_POSITION_IDS


def windows(result, layers: int) -> list[int | None]:
    """Each decoder layer's sliding window (None: a DynamicLayer, which keeps every position)."""
    config = _config(result)
    window = config.get("sliding_window")
    if not config.get("use_sliding_window", True):
        window = None
    types = config.get("layer_types")
    if not isinstance(types, list) or len(types) != layers:
        first = config.get("max_window_layers", 0) if "use_sliding_window" in config else 0
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(layers)]
    return [window if kind == "sliding_attention" and isinstance(window, int) else None for kind in types]


def kept(window: int | None, prompt: int, past: int) -> int:
    """Positions a layer's storage holds once ``past`` positions have been fed (``past`` >= ``prompt``)."""
    if window is None or past == prompt:  # a full layer; a sliding one right after the prefill keeps the prompt
        return past
    return min(past, window)


def visible(window: int | None, past: int) -> int:
    """Cached positions a layer concatenates the new ones onto: all of them, or the window's view of them."""
    return past if window is None else min(past, window - 1)
