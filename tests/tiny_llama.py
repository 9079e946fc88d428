"""A tiny random Llama and a character-level tokenizer, built offline for the model tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

VOCAB = 128
TEXT = ("The Jargon File is a comprehensive compendium of hacker slang illuminating many aspects of hackish "
        "tradition, folklore, and humor. A hacker is a person who enjoys exploring the details of programmable "
        "systems and how to stretch their capabilities, as opposed to most users, who prefer to learn only the "
        "minimum necessary.\n") * 12


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_model(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config()).eval()


def tiny_tokenizer():
    """Characters 32..126 and newline, one token each (ids < VOCAB)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    vocab["\n"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def write_tiny_model_dir(path) -> None:
    model = tiny_model()
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
