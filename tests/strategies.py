"""Hypothesis strategies: random but valid configs for every family (shared by the property tests)."""

from hypothesis import strategies as st

from paramcalc import families

sizes = st.integers(min_value=1, max_value=48)
small = st.integers(min_value=1, max_value=3)


def tasks(family):
    return st.sampled_from(sorted(families.families()[family].tasks))


@st.composite
def bert_like(draw, model_type):
    heads, head_dim = draw(small), draw(st.integers(1, 8))
    return {
        "model_type": model_type, "vocab_size": draw(sizes), "hidden_size": heads * head_dim,
        "num_attention_heads": heads, "num_hidden_layers": draw(small), "intermediate_size": draw(sizes),
        "max_position_embeddings": draw(st.integers(8, 64)), "type_vocab_size": draw(st.integers(1, 4)),
        "tie_word_embeddings": draw(st.booleans()), "pad_token_id": 0,
    }


@st.composite
def gpt2_configs(draw):
    heads, head_dim = draw(small), draw(st.integers(1, 8))
    return {
        "model_type": "gpt2", "vocab_size": draw(sizes), "n_embd": heads * head_dim, "n_head": heads,
        "n_layer": draw(small), "n_positions": draw(sizes), "n_inner": draw(st.none() | sizes),
        "tie_word_embeddings": draw(st.booleans()), "bos_token_id": 0, "eos_token_id": 0,
    }


@st.composite
def bloom_configs(draw):
    heads, head_dim = draw(small), draw(st.integers(1, 8))
    return {
        "model_type": "bloom", "vocab_size": draw(sizes), "hidden_size": heads * head_dim, "n_head": heads,
        "n_layer": draw(small), "tie_word_embeddings": draw(st.booleans()), "bos_token_id": 0,
        "eos_token_id": 0,
    }


@st.composite
def t5_configs(draw):
    return {
        "model_type": "t5", "vocab_size": draw(sizes), "d_model": draw(sizes), "d_kv": draw(st.integers(1, 8)),
        "num_heads": draw(small), "d_ff": draw(sizes), "num_layers": draw(small),
        "num_decoder_layers": draw(st.none() | small), "relative_attention_num_buckets": draw(st.integers(1, 40)),
        "feed_forward_proj": draw(st.sampled_from(["relu", "gelu", "gated-gelu", "gated-silu"])),
        "tie_word_embeddings": draw(st.booleans()), "eos_token_id": 0, "pad_token_id": 0,
    }


@st.composite
def llama_like(draw, model_type):
    """Grouped-query decoders: KV heads divide the query heads; head_dim given or H/A; odd sizes; tied or not;
    Llama's bias switches (ignored by Mistral, Qwen2 and Mixtral, as their code ignores them)."""
    kv, groups = draw(small), draw(small)
    rotary = st.sampled_from([2, 4, 6, 8])  # rotary positions turn pairs of a head's features: even widths
    heads, head_dim = kv * groups, draw(rotary)
    config = {
        "model_type": model_type, "vocab_size": draw(sizes), "hidden_size": draw(rotary) * heads,
        "num_attention_heads": heads, "num_key_value_heads": kv,
        "num_hidden_layers": draw(small), "intermediate_size": draw(sizes), "max_position_embeddings": 64,
        "tie_word_embeddings": draw(st.booleans()), "attention_bias": draw(st.booleans()),
        "mlp_bias": draw(st.booleans()),
    }
    if draw(st.booleans()):
        config["head_dim"] = head_dim
    if model_type == "llama" and groups == 1 and draw(st.booleans()):  # LlamaConfig: null K/V heads = A
        config["num_key_value_heads"] = None
    if model_type == "mixtral":
        experts = draw(st.integers(1, 5))
        config |= {"num_local_experts": experts, "num_experts_per_tok": draw(st.integers(1, experts))}
    return config


STRATEGIES = {
    "bert": bert_like("bert"),
    "roberta": bert_like("roberta"),
    "gpt2": gpt2_configs(),
    "bloom": bloom_configs(),
    "t5": t5_configs(),
    "llama": llama_like("llama"),
    "mistral": llama_like("mistral"),
    "qwen2": llama_like("qwen2"),
    "mixtral": llama_like("mixtral"),
}

# The families whose file describes a training step's flow: the memory replay and analytic FLOPs cover them (the
# others are traced on fake tensors)
REPLAYED = {family: strategy for family, strategy in STRATEGIES.items() if families.families()[family].flow}
