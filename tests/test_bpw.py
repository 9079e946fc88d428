"""quantize_model(bpw=R): per-layer configs allocated for a mean rate R on a tiny random Llama
(CPU, offline): the rate is met, the choices are saved and load back, bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from pvq_cuda.format import PVQConfig, stored_bits  # noqa: E402
from pvq_cuda.pipeline.allocate import BPW_TOLERANCE  # noqa: E402
from tiny_llama import logits, quantize_quietly, random_ids, tiny_config, tiny_model  # noqa: E402


def stored_rate(model) -> float:
    """Mean stored bits per weight of the model's PVQ layers, counted from the layers themselves."""
    bits = weights = 0
    for mod in model.modules():
        if isinstance(mod, pvq_cuda.PVQLinear):
            bits += stored_bits(mod.config, mod.out_features, mod.in_features)
            weights += mod.out_features * mod.in_features
    return bits / weights


def choices(log) -> dict:
    """The log's allocation without its time."""
    return {k: v for k, v in log["allocation"].items() if k != "seconds"}


@pytest.mark.parametrize("method,rate", [("pvq", 3.0), ("pvq", 2.0), ("pvq-datafree", 4.5), ("pvq", 2.61)])
def test_rate_is_met(method, rate):
    model = tiny_model(1)
    log = quantize_quietly(model, random_ids(8, 32, seed=3), method=method, bpw=rate)
    assert abs(log["bpw"] - rate) <= BPW_TOLERANCE
    assert stored_rate(model) == pytest.approx(log["bpw"], rel=1e-12)
    alloc = log["allocation"]
    assert alloc["bpw"] == rate and alloc["achieved"] == pytest.approx(log["bpw"], rel=1e-12)
    assert alloc["predicted_loss"] > 0 and len(alloc["layers"]) == 14
    # every layer got what the allocation chose
    for e in log["layers"]:
        cfg = PVQConfig(**alloc["layers"][e["name"]])
        assert model.get_submodule(e["name"]).config == cfg


def test_rates_order_the_loss():
    """More bits, less predicted and less actual loss."""
    calib = random_ids(8, 32, seed=4)
    logs = [quantize_quietly(tiny_model(2), calib, bpw=r) for r in (2.25, 3.25, 4.25)]
    predicted = [log["allocation"]["predicted_loss"] for log in logs]
    actual = [sum(e["loss"] for e in log["layers"]) for log in logs]
    assert predicted[0] > predicted[1] > predicted[2]
    assert actual[0] > actual[1] > actual[2]


def test_saved_choices_load_back(tmp_path):
    model = tiny_model(3)
    log = quantize_quietly(model, random_ids(8, 32, seed=5), bpw=2.8)
    configs = {c["K"] for c in log["allocation"]["layers"].values()}
    assert len(configs) > 1, "the tiny model's layers should not all get one config"
    out = pvq_cuda.save_quantized(model, tmp_path / "q")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["module_overrides"], "layers that differ from the default config are listed"
    loaded = pvq_cuda.load_quantized(out)
    for name, cfg in log["allocation"]["layers"].items():
        assert loaded.get_submodule(name).config == PVQConfig(**cfg)
    ids = random_ids(2, 16, seed=6)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_several_rates_in_one_call():
    calib = random_ids(8, 32, seed=7)
    models = [tiny_model(4), tiny_model(4)]
    logs = pvq_cuda.quantize_models(models, calib, [{"bpw": 2.5}, {"bpw": 3.5}], progress=False, batch_size=4,
                                    fp_targets=True)
    assert [round(log["bpw"], 2) for log in logs] == pytest.approx([2.5, 3.5], abs=BPW_TOLERANCE)


def test_a_sweep_computes_the_statistics_once(monkeypatch):
    """Copies of one model on one calibration set share the allocation's fp pass; a change to any
    weight, the calibration or the damping gets its own, and the memo never changes the result."""
    from transformers import LlamaForCausalLM

    from pvq_cuda.pipeline import allocate

    allocate._STATS_MEMO.clear()
    passes = []
    monkeypatch.setattr(allocate, "fp_layer_stats",
                        lambda run, names, f=allocate.fp_layer_stats: passes.append(1) or f(run, names))
    calib = random_ids(8, 32, seed=8)
    logs = [quantize_quietly(tiny_model(5), calib, bpw=r) for r in (2.5, 3.5, 2.5)]
    assert len(passes) == 1
    assert choices(logs[2]) == choices(logs[0])
    # each run's time counts its statistics pass: the first paid for it, the third found it
    assert all(log["seconds"] >= log["allocation"]["seconds"] > 0 for log in logs)
    assert logs[2]["allocation"]["seconds"] < logs[0]["allocation"]["seconds"]
    changed = tiny_model(5)
    with torch.no_grad():
        changed.model.layers[0].input_layernorm.weight[0] += 1e-3  # not a quantized layer, but in the fp pass
    quantize_quietly(changed, calib, bpw=2.5)
    assert len(passes) == 2
    quantize_quietly(tiny_model(5), random_ids(8, 32, seed=9), bpw=2.5)
    quantize_quietly(tiny_model(5), calib, bpw=2.5, damp=0.05)
    quantize_quietly(tiny_model(5), calib, bpw=2.5, config=PVQConfig(D=16, K=30, scale_bits=2, seed=1))
    quantize_quietly(tiny_model(5), calib, bpw=2.5, ignore=r"\.0\.mlp\.down_proj$")
    assert len(passes) == 6
    # the same weights (same seed, same shapes) under another config: the fp pass differs
    other_config = tiny_config()
    other_config.rms_norm_eps = 1e-3
    torch.manual_seed(5)
    quantize_quietly(LlamaForCausalLM(other_config).eval(), calib, bpw=2.5)
    assert len(passes) == 7
    allocate._STATS_MEMO.clear()
    fresh = quantize_quietly(tiny_model(5), calib, bpw=2.5)
    assert len(passes) == 8 and choices(fresh) == choices(logs[0])
    assert [e["loss"] for e in fresh["layers"]] == [e["loss"] for e in logs[0]["layers"]]


def test_the_statistics_pass_builds_no_autograd_graph(monkeypatch):
    """The allocation's fp pass runs before the pipeline's no_grad; with autograd on it kept every
    block's graph alive (24 GB on SmolLM2-135M)."""
    from pvq_cuda.pipeline import allocate

    allocate._STATS_MEMO.clear()
    grad_enabled = []
    monkeypatch.setattr(allocate, "layer_stats",
                        lambda *a, f=allocate.layer_stats: grad_enabled.append(torch.is_grad_enabled()) or f(*a))
    quantize_quietly(tiny_model(6), random_ids(8, 32, seed=10), bpw=3.0)
    assert len(grad_enabled) == 14 and not any(grad_enabled)


def test_output_sensitivity_predicts_the_kl():
    """F predicts what white noise on one layer's output does to the model's output: the measured
    KL(fp ‖ noisy) on held-out tokens is ½·σ²·N·F to within 0.65-1.5x on every layer, while F itself
    spans six decades across them (q/k tiny, o/down large)."""
    from torch.nn import functional as F

    from pvq_cuda.pipeline.allocate import output_sensitivity

    model = tiny_model(0)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.")}
    calib = random_ids(64, 64, seed=1)
    sens = output_sensitivity(model, names, [calib[:8], calib[8:]], seed=0)
    assert set(sens) == names and max(sens.values()) / min(sens.values()) > 1e5
    ids = random_ids(16, 64, seed=9)
    ref = F.log_softmax(logits(model, ids).float(), -1)
    for name in sorted(names):
        lin = model.get_submodule(name)
        sigma = 0.05 / (sens[name] * lin.out_features) ** 0.5  # a predicted KL of 1.25e-3 nats
        g = torch.Generator().manual_seed(0)
        handle = lin.register_forward_hook(lambda m, a, out: out + sigma * torch.randn(out.shape, generator=g))
        kl = 0.0
        for _ in range(4):
            q = F.log_softmax(logits(model, ids).float(), -1)
            kl += float((ref.exp() * (ref - q)).sum(-1).mean()) / 4
        handle.remove()
        assert 0.65 < kl / (0.5 * sigma ** 2 * lin.out_features * sens[name]) < 1.5, name


def test_the_sensitivity_pass_leaves_the_model_as_it_was():
    """No gradients on the parameters, every requires_grad flag back as it was, no hooks left, and
    the same numbers for the same seed; the allocation's log reports F per layer (1 data-free)."""
    from pvq_cuda.pipeline.allocate import output_sensitivity

    model = tiny_model(7)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = {"model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"}
    calib = random_ids(4, 32, seed=2)
    first = output_sensitivity(model, names, [calib], seed=3)
    assert first == output_sensitivity(model, names, [calib], seed=3) != output_sensitivity(model, names, [calib])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    log = quantize_quietly(model, calib, bpw=3.0)
    assert set(log["allocation"]["sensitivity"]) == set(log["allocation"]["layers"])
    assert all(f > 0 and f != 1.0 for f in log["allocation"]["sensitivity"].values())
    free = quantize_quietly(tiny_model(7), None, method="pvq-datafree", bpw=3.0)
    assert set(free["allocation"]["sensitivity"].values()) == {1.0}


def test_the_sensitivity_reads_whole_windows_up_to_its_token_count(monkeypatch):
    from pvq_cuda.pipeline import allocate

    model, names = tiny_model(8), {"model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"}
    calib = random_ids(6, 24, seed=4)
    monkeypatch.setattr(allocate, "SENSITIVITY_TOKENS", 60)  # 2.5 windows: three are read
    capped = allocate.output_sensitivity(model, names, [calib[:2], calib[2:]], seed=1)
    assert capped == allocate.output_sensitivity(model, names, [calib[:3]], seed=1)
    assert capped != allocate.output_sensitivity(model, names, [calib[:2]], seed=1)


def test_leading_windows_are_whole_and_keep_their_batches():
    from pvq_cuda.pipeline.allocate import leading_windows

    chunks = [random_ids(3, 10, seed=1), random_ids(2, 10, seed=2), random_ids(4, 7, seed=3)]
    for tokens, rows in [(1, [1]), (10, [1]), (11, [2]), (30, [3]), (31, [3, 1]), (55, [3, 2, 1]), (10**6, [3, 2, 4])]:
        got = leading_windows(chunks, tokens)
        assert [c.shape[0] for c in got] == rows, tokens
        assert all(torch.equal(g, c[:g.shape[0]]) for g, c in zip(got, chunks))


def test_the_hessians_read_the_first_windows_for_four_tokens_per_input(monkeypatch):
    """The allocation's Hessians come from the first whole windows that hold TOKENS_PER_INPUT (4)
    tokens per input feature of the widest layer (down_proj's 128 here: 512 tokens, 16 windows of
    32), batched as quantize_model batched them: the same sums as a calibration of those windows."""
    from pvq_cuda.pipeline import allocate

    monkeypatch.setattr(allocate, "HESSIAN_TOKENS", 1)
    monkeypatch.setattr(allocate, "SENSITIVITY_TOKENS", 32)  # one window, the same in every run
    seen = []
    monkeypatch.setattr(allocate, "layer_stats",
                        lambda w, h, seed, f=allocate.layer_stats: seen.append(h) or f(w, h, seed))
    calib = random_ids(24, 32, seed=11)

    def hessians(part):
        seen.clear()
        allocate._STATS_MEMO.clear()
        quantize_quietly(tiny_model(9), part, bpw=3.0)
        assert len(seen) == 14
        return list(seen)

    first16 = hessians(calib[:16])
    assert all(torch.equal(a, b) for a, b in zip(hessians(calib), first16))
    monkeypatch.setattr(allocate, "TOKENS_PER_INPUT", 5)  # 640 tokens: 20 windows
    assert not any(torch.equal(a, b) for a, b in zip(hessians(calib), first16))
    allocate._STATS_MEMO.clear()


@pytest.mark.parametrize("bad", [1.9, 4.6, True, "3", float("nan")])
def test_bad_rate(bad):
    with pytest.raises(ValueError, match=r"bpw must be a number in \[2.0, 4.5\]"):
        pvq_cuda.quantize_model(tiny_model(), random_ids(4, 16, seed=1), bpw=bad, progress=False)


def test_bpw_refuses_other_methods_and_overrides():
    calib = random_ids(4, 16, seed=1)
    with pytest.raises(ValueError, match="method 'rtn-int4' is not PVQ"):
        pvq_cuda.quantize_model(tiny_model(), calib, method="rtn-int4", bpw=3.0, progress=False)
    with pytest.raises(ValueError, match="cannot be combined with overrides"):
        pvq_cuda.quantize_model(tiny_model(), calib, bpw=3.0, overrides={"mlp": "pvq-4.25"}, progress=False)
