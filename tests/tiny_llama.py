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


def random_ids(n: int, seqlen: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    """Seeded random token ids [n, seqlen]: calibration and test inputs of the tiny models."""
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def quantize_quietly(model, calibration, config="pvq-3.25", **kw) -> dict:
    """quantize_model without a progress bar, 4 windows a forward, the data-free fallback warning
    (where it applies) silenced; returns the log."""
    import warnings

    import pvq_cuda

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return pvq_cuda.quantize_model(model, calibration, config, progress=False, batch_size=4, **kw)


def tiny_tokenizer(bos: str | None = None):
    """Characters 32..126 and newline, one token each (ids < VOCAB). ``bos="added"``: a "<bos>"
    token (id 97) starts every encoded text, as with Gemma's tokenizer; ``bos="unused"``: "<bos>"
    is the BOS token but never added, as SmolLM2's <|im_start|>; None: no BOS token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    vocab["\n"] = len(vocab)
    if bos is not None:
        vocab["<bos>"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    if bos == "added":
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                          special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>",
                                   **({"bos_token": "<bos>"} if bos is not None else {}))


def write_tiny_model_dir(path, bos: str | None = None) -> None:
    model = tiny_model()
    model.save_pretrained(str(path))
    tiny_tokenizer(bos).save_pretrained(str(path))
