"""transformers: AutoModelForCausalLM.from_pretrained and save_pretrained on pvq_cuda checkpoints."""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from pvq_cuda import PVQLinear  # noqa: E402
from tiny_llama import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

IGNORED = "model.layers.1.mlp.down_proj"    # stays dense: modules_to_not_convert
OVERRIDDEN = "model.layers.0.self_attn.v_proj"  # another config: module_overrides


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model()
    calib = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    pvq_cuda.quantize_model(model, calib, "pvq-3.25", ignore=IGNORED.replace(".", r"\.") + "$",
                            overrides={OVERRIDDEN.replace(".", r"\.") + "$": "pvq8-3.25"}, progress=False, device="cpu")
    path = tmp_path_factory.mktemp("ckpt") / "q"
    pvq_cuda.save_quantized(model, path, tokenizer=tiny_tokenizer())
    return path


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens.to(model.device)).logits


def test_from_pretrained_equals_load_quantized(checkpoint, tokens):
    ref = pvq_cuda.load_quantized(checkpoint)
    hf = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert torch.equal(_logits(hf, tokens), _logits(ref, tokens))
    layers = {n: m for n, m in hf.named_modules() if isinstance(m, PVQLinear)}
    assert len(layers) == 13 and IGNORED not in layers
    assert type(hf.get_submodule(IGNORED)) is torch.nn.Linear
    assert torch.equal(hf.get_submodule(IGNORED).weight, ref.get_submodule(IGNORED).weight)
    assert layers[OVERRIDDEN].config == pvq_cuda.PVQConfig.preset("pvq8-3.25")
    assert layers["model.layers.0.self_attn.q_proj"].config == pvq_cuda.PVQConfig.preset("pvq-3.25")
    assert hf.config.quantization_config.quant_method == "pvq" and hf.hf_quantizer.is_trainable


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto"], ids=str)
def test_device_map(checkpoint, tokens, device_map):
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device_map)
    assert torch.equal(_logits(hf, tokens).cpu(), _logits(pvq_cuda.load_quantized(checkpoint), tokens))


def test_dtype_keeps_the_packed_buffers(checkpoint, tokens):
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    q = hf.get_submodule("model.layers.0.self_attn.q_proj")
    assert (q.codes.dtype, q.row_scale.dtype, q.levels.dtype) == (torch.int32, torch.float16, torch.float32)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    got, want = _logits(hf, tokens), _logits(pvq_cuda.load_quantized(checkpoint), tokens)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).norm() / want.norm() < 0.05


def test_save_pretrained_round_trip(checkpoint, tokens, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(checkpoint)
    hf.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    want = _logits(pvq_cuda.load_quantized(checkpoint), tokens)
    assert torch.equal(_logits(again, tokens), want)
    # transformers' shards are plain safetensors; load_quantized rebuilds the PVQ layers from them too
    assert torch.equal(_logits(pvq_cuda.load_quantized(tmp_path / "again"), tokens), want)
    # and pvq_cuda's own save of a transformers-loaded model is a full checkpoint again
    pvq_cuda.save_quantized(again, tmp_path / "ours")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ours"), tokens), want)


def test_without_import_pvq_cuda_the_load_fails_loudly(checkpoint):
    """transformers alone does not know "pvq": it must not hand back a model with random linears."""
    code = ("from transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})\n"
            "print('LOADED')\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "LOADED" not in out, out[-2000:]
    assert "pvq" in out and "mismatch" in out.lower(), out[-2000:]


@requires_cuda
def test_from_pretrained_on_cuda(checkpoint, tokens):
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, device_map={"": 0})
    assert hf.get_submodule("model.layers.0.self_attn.q_proj").codes.is_cuda
    got, want = _logits(hf, tokens).cpu(), _logits(pvq_cuda.load_quantized(checkpoint), tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
