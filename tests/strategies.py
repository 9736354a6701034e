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


STRATEGIES = {
    "bert": bert_like("bert"),
    "roberta": bert_like("roberta"),
    "gpt2": gpt2_configs(),
    "bloom": bloom_configs(),
    "t5": t5_configs(),
}
