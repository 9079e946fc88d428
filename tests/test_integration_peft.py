"""PEFT LoRA on PVQ layers: get_peft_model wraps them, a few steps lower the loss, the adapter saves
and loads, merging is refused, and other module types get PEFT's own clear error."""

import warnings

import pytest
import torch

pytest.importorskip("peft")

import pvq_cuda  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from pvq_cuda import PVQLinear  # noqa: E402
from pvq_cuda.integrations.peft_lora import PVQLoraLinear  # noqa: E402
from tiny_llama import TEXT, tiny_model, tiny_tokenizer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = tiny_model()
    tok = tiny_tokenizer()
    calib = tok(TEXT[:400], return_tensors="pt")["input_ids"].reshape(4, -1)
    pvq_cuda.quantize_model(model, calib, "pvq-3.25", progress=False, device="cpu")
    path = tmp_path_factory.mktemp("peft") / "q"
    pvq_cuda.save_quantized(model, path, tokenizer=tok)
    return path


def _batch():
    ids = tiny_tokenizer()(TEXT[:1000], return_tensors="pt")["input_ids"]
    return ids[:, : 4 * 96].reshape(4, 96)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_lora_trains_saves_and_loads(checkpoint, tmp_path):
    torch.manual_seed(0)
    model = pvq_cuda.load_quantized(checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0))
    # PEFT's "Unsupported layer type ... at your own risk" would be noise: PVQLinear is supported
    assert not [w for w in caught if "Unsupported layer type" in str(w.message)]
    wrapped = [m for m in peft_model.modules() if isinstance(m, PVQLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS)
    assert all(isinstance(m.base_layer, PVQLinear) for m in wrapped)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    ids = _batch()
    opt = torch.optim.AdamW(trainable, lr=5e-3)
    losses = []
    for _ in range(12):
        loss = _loss(peft_model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # the earliest adapter got a gradient through every PVQ layer behind it
    assert wrapped[0].lora_A["default"].weight.grad.abs().sum() > 0

    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        trained = _loss(peft_model, ids).item()
    fresh = PeftModel.from_pretrained(pvq_cuda.load_quantized(checkpoint), tmp_path / "adapter")
    assert sum(isinstance(m, PVQLoraLinear) for m in fresh.modules()) == 2 * len(TARGETS)
    with torch.no_grad():
        assert _loss(fresh, ids).item() == pytest.approx(trained, rel=1e-6)


def test_lora_on_from_pretrained_model(checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert model.hf_quantizer.is_trainable
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"]))
    assert sum(isinstance(m, PVQLoraLinear) for m in peft_model.modules()) == 2
    _loss(peft_model, _batch()).backward()


def test_merge_is_refused(checkpoint):
    peft_model = get_peft_model(pvq_cuda.load_quantized(checkpoint), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merging a LoRA adapter into a PVQ layer is not possible"):
        peft_model.merge_and_unload()


def test_other_module_types_get_a_clear_error(checkpoint):
    with pytest.raises(ValueError, match="Target module .*not supported"):
        get_peft_model(pvq_cuda.load_quantized(checkpoint), LoraConfig(r=4, target_modules=["input_layernorm"]))
