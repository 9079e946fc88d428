"""Tiny random causal LMs of the architectures the pipeline supports beyond Llama, built offline
from transformers config classes (nothing is downloaded), for tests/test_architectures.py.

Widths are multiples of the group size D=16 and Hadamard sizes n = m·2^k, m in {1, 12, 20, 28,
36, 52, 60}, as the real models' are: Gemma-3 270M's hidden 640 = 20·32 becomes 80 = 20·4 here,
Gemma-2 9B's 3584 = 28·128 becomes 112 = 28·4 (an odd number of 16-groups, 5 and 7). Sliding
windows are shorter than the calibration windows, so that the blocks of each layer type really
get different attention masks (and, in Gemma-3, different rotary embeddings).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tiny_llama import VOCAB  # noqa: E402  (the tiny Llama's: one vocabulary for all tiny models)
SEQLEN = 24          # calibration and test windows
SLIDING_WINDOW = 8   # < SEQLEN

_COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
               pad_token_id=0)

#: name -> (config class, model class, config arguments, whether LlamaFlow's probe should pass)
ARCHITECTURES = {
    # q/k/v biases; the small Qwen2 models tie their embeddings
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
              sliding_window=SLIDING_WINDOW, max_window_layers=1), True),
    # q/k norms inside the attention; heads*head_dim (128) != hidden (64), as in Qwen3
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32), True),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=64, intermediate_size=192,
                num_attention_heads=4, num_key_value_heads=1, sliding_window=SLIDING_WINDOW), True),
    # fused qkv_proj and gate_up_proj
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2), False),
    # norms after the attention and the MLP, tied embeddings, logit soft-capping, sliding/full layers
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(hidden_size=112, intermediate_size=224,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
               sliding_window=SLIDING_WINDOW), False),
    # Gemma-2's norms plus q/k norms; a sliding layer and a full one, each with its own rotary base
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(hidden_size=80, intermediate_size=160,
               num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
               sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"]), False),
    # no input norms: norms after the attention and the MLP, q/k norms over all heads
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=4), False),
}


def tiny_arch_config(name: str):
    import transformers

    config_cls, _, kwargs, _ = ARCHITECTURES[name]
    return getattr(transformers, config_cls)(**_COMMON, **kwargs)


def tiny_arch_model(name: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, ARCHITECTURES[name][1])(tiny_arch_config(name)).eval()
    # Gemma's and OLMo-2's norms start as identities (weights 0 or 1): random ones make every
    # norm count in the checks, as in a trained model.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 and "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    return model


def staged_by_probe(name: str) -> bool:
    return ARCHITECTURES[name][3]
