"""Tiny configs of every family (2 layers, width 64): real training steps in a second or two, shared by the
trainer and adapter tests."""

TINY = {
    "bert": ({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "intermediate_size": 128, "vocab_size": 300, "max_position_embeddings": 64}, "seq-cls"),
    "roberta": ({"model_type": "roberta", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                 "intermediate_size": 128, "vocab_size": 300, "max_position_embeddings": 66, "pad_token_id": 1},
                "token-cls"),
    "gpt2": ({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 300, "n_positions": 64},
             "causal-lm"),
    "bloom": ({"model_type": "bloom", "n_layer": 2, "hidden_size": 64, "n_head": 4, "vocab_size": 300}, "causal-lm"),
    "t5": ({"model_type": "t5", "num_layers": 2, "d_model": 64, "num_heads": 4, "d_kv": 16, "d_ff": 128,
            "vocab_size": 300}, "seq2seq-lm"),
}

# The grouped-query decoders (2 K/V heads for 4 query heads): Llama, Mistral and Qwen2 replayed op by op, Mixtral (its
# routed experts) traced on fake tensors
TINY_GQA = {
    family: ({"model_type": family, "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 64,
              **({"num_local_experts": 4, "num_experts_per_tok": 2} if family == "mixtral" else {})}, "causal-lm")
    for family in ("llama", "mistral", "qwen2", "mixtral")
}
