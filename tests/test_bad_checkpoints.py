"""A broken checkpoint directory gets one clear error, from load_quantized and from from_pretrained:
a missing shard, a quant_method other than "pvq", a format_version newer than this pvq_cuda's."""

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from tiny_llama import tiny_model, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


@pytest.fixture
def sharded(tmp_path):
    model = tiny_model()
    pvq_cuda.quantize_model(model, method="pvq-datafree", progress=False, device="cpu")
    path = tmp_path / "q"
    pvq_cuda.save_quantized(model, path, tokenizer=tiny_tokenizer(), max_shard_size=20_000)
    assert len(list(path.glob("model-*.safetensors"))) > 2
    return path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"lacks shard\(s\) \['{re.escape(victim.name)}'\]"):
        pvq_cuda.load_quantized(sharded)
    with pytest.raises(OSError, match=re.escape(victim.name)):
        AutoModelForCausalLM.from_pretrained(sharded)


def test_quant_method_not_pvq(sharded):
    _edit_config(sharded, quant_method="pvq2")
    with pytest.raises(ValueError, match="has no quantization_config with quant_method 'pvq'"):
        pvq_cuda.load_quantized(sharded)
    # transformers does not know "pvq2" and loads densely: the placeholder makes that fail loudly
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(sharded)


def test_newer_format_version(sharded):
    _edit_config(sharded, format_version=pvq_cuda.format.weight.LAYOUT_VERSION + 1)
    msg = r"format_version 2; this pvq_cuda reads 1..1 \(a newer checkpoint needs a newer pvq_cuda\)"
    with pytest.raises(ValueError, match=msg):
        pvq_cuda.load_quantized(sharded)
    with pytest.raises(ValueError, match=msg):
        AutoModelForCausalLM.from_pretrained(sharded)


def test_config_that_does_not_fit_the_codes(sharded):
    _edit_config(sharded, K=29)  # a K other than the codes were made with
    with pytest.raises(ValueError, match="q_proj|codes|K"):
        pvq_cuda.load_quantized(sharded)
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(sharded)


def test_good_checkpoint_still_loads(sharded):
    tokens = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(sharded)(tokens).logits,
                           pvq_cuda.load_quantized(sharded)(tokens).logits)
