"""W+A at the layer and model level: PVQLinear with an act_config, quantize_model(act_config=...),
the checkpoint (save_quantized / load_quantized / from_pretrained), the INT activation baselines
and `pvq-cuda compare --act` / `quantize --act-config` on a tiny random Llama (CPU, offline)."""

import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from pvq_cuda.format.activation import ACT_PRESETS, ActivationConfig, code_activations, wa_matmul  # noqa: E402
from pvq_cuda.layers import set_activation_coding  # noqa: E402
from pvq_cuda.quantization.act_baselines import parse_activation_baseline, simulated_activations  # noqa: E402
from conftest import requires_cuda  # noqa: E402
from tiny_llama import TEXT, VOCAB, tiny_model, write_tiny_model_dir  # noqa: E402


def _calib(n=6, seqlen=24, seed=1):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def wa_model():
    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        log = pvq_cuda.quantize_model(model, _calib(), "pvq-3.25", progress=False, batch_size=4,
                                      act_config="pvq-a6.25")
    return model, log


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------

def _layer(n=96, N=50, act="pvq-a4.25", bias=True):
    torch.manual_seed(n + N)
    return pvq_cuda.PVQLinear.from_linear(nn.Linear(n, N, bias=bias), pvq_cuda.PVQConfig.preset("pvq-4.25")), act


def test_layer_forward_is_the_wa_product():
    layer, act = _layer()
    x = torch.randn(2, 5, 96) * 3
    plain = layer(x)
    layer.set_activation_config(act)
    out = layer(x)
    codes = code_activations(x, ACT_PRESETS[act], layer.signs)
    assert torch.equal(out, wa_matmul(codes, layer.weight, layer.bias))
    assert 0 < float((out - plain).norm() / plain.norm()) < 0.2  # A4.25 adds ~5-10 % error here
    # the decoded-cache path: the same product as dense fp32 operands (rotated basis)
    layer.enable_decoded_cache()
    dense = layer(x)
    layer.disable_decoded_cache()
    assert torch.allclose(dense, out, rtol=1e-5, atol=1e-5 * float(out.abs().max()))
    # 16-bit inputs: coded from their fp32 rotation, output in the input's dtype
    assert layer(x.half()).dtype == torch.float16 and layer(x.bfloat16()).dtype == torch.bfloat16
    layer.set_activation_config(None)
    assert torch.equal(layer(x), plain)


def test_layer_shares_codes_of_one_input_and_recodes_after_changes(monkeypatch):
    import pvq_cuda.layers.linear as linear

    a, act = _layer(96, 40)
    b, _ = _layer(96, 30)
    for m in (a, b):
        m.set_activation_config(act)
    calls = []
    real = linear.code_activations
    monkeypatch.setattr(linear, "code_activations", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    x = torch.randn(7, 96)
    ya, yb = a(x), b(x)
    assert len(calls) == 1  # q/k/v-style: one input, one rotation (same seed), coded once
    x.mul_(2)  # in place: a new version, coded again (codes of 2x: the same pulses, twice the scale)
    assert torch.allclose(a(x) - a.bias, 2 * (ya - a.bias), rtol=1e-5, atol=1e-5) and len(calls) == 2
    assert torch.equal(b(x.clone()), b(x)) and len(calls) == 4  # an equal but distinct tensor is coded anew
    c = pvq_cuda.PVQLinear.from_weight(pvq_cuda.quantize_weight(torch.randn(20, 96),
                                                                pvq_cuda.PVQConfig.preset("pvq-4.25", seed=5)))
    c.set_activation_config(act)
    c(x)
    assert len(calls) == 5  # another rotation seed: its own codes
    del yb


def test_layer_state_dict_and_dtype_moves_keep_the_act_config():
    layer, act = _layer(64, 33)
    layer.set_activation_config(act)
    state = layer.state_dict()
    assert "act_levels" not in state and state["_extra_state"]["act_config"] == ACT_PRESETS[act].to_dict()
    other = pvq_cuda.PVQLinear(64, 33, config=layer.config)
    other.load_state_dict(state)
    x = torch.randn(4, 64)
    assert other.act_config == ACT_PRESETS[act] and torch.equal(other(x), layer(x))
    layer.to(torch.bfloat16)
    assert layer.act_levels.dtype == torch.float32 and layer.row_scale.dtype == torch.float16
    assert "act: D=8, K=29, gain_bits=4" in repr(layer)


def _massive_tokens(n=96, T=9, seed=0):
    """T Gaussian tokens; token 3 is massive (a 200x spike on one channel, as the first token of a
    sequence in some down_proj inputs), token 6 is 2x the others (not massive)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, n, generator=gen)
    x[3, 17] += 200 * n**0.5
    x[6] *= 2
    return x


@pytest.mark.parametrize("act", list(ACT_PRESETS))
def test_massive_tokens_get_a_second_stage(act):
    from reference_activation import wa_reference

    layer, _ = _layer(96, 40)
    x = _massive_tokens()
    median = float(x.norm(dim=-1).median())
    layer.set_input_norm(median)
    layer.set_activation_config(act)
    cfg = ACT_PRESETS[act]
    one = code_activations(x, cfg, layer.signs)
    two = code_activations(x, cfg, layer.signs, input_norm=median)
    assert one.outliers is None and two.outliers.tolist() == [3] and two.residual.pulses.shape == (1, 96)
    # stage one is the one-stage code; the flagged token's error shrinks by about the stage's SNR
    for field in ("pulses", "index", "gain", "scale"):
        assert torch.equal(getattr(one, field), getattr(two, field))
    rotated = pvq_cuda.hadamard_transform(x, layer.signs)
    err1 = (one.dequantize() - rotated).norm(dim=-1)
    err2 = (two.dequantize() - rotated).norm(dim=-1)
    assert torch.equal(err1[[0, 1, 2, 4, 5, 6, 7, 8]], err2[[0, 1, 2, 4, 5, 6, 7, 8]])
    assert float(err2[3]) < 0.1 * float(err1[3])
    # rate: one stage per token, a second on 1 of 9
    assert two.bits_per_activation() == pytest.approx(cfg.bits_per_activation(96) * 10 / 9)
    # the layer: the W+A product of both stages, within float32 of the float64 product
    out = layer(x)
    assert torch.equal(out, wa_matmul(two, layer.weight, layer.bias))
    r = two.residual
    want = wa_reference(two.pulses, two.gain, two.scale, two.levels, cfg.D, layer.weight, layer.bias)
    want[3] += wa_reference(r.pulses, r.gain, r.scale, r.levels, cfg.D, layer.weight)[0]
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert layer.activation_bits() == pytest.approx(cfg.bits_per_activation(96) * 10 / 9)
    layer.enable_decoded_cache()
    assert torch.allclose(layer(x), out, rtol=1e-5, atol=1e-5 * float(out.abs().max()))
    # the second stage is what makes the massive token's output accurate
    layer.disable_decoded_cache()
    exact = nn.functional.linear(rotated, layer.weight.dequantize(rotated=True), layer.bias)
    single = wa_matmul(one, layer.weight, layer.bias)
    assert float((out[3] - exact[3]).norm()) < 0.2 * float((single[3] - exact[3]).norm())
    # leading dims, 16-bit inputs, and no flag without a calibration norm or with outlier_ratio None
    assert torch.equal(layer(x.view(3, 3, 96)).view(9, 40), out)
    assert code_activations(x.half(), cfg, layer.signs, input_norm=median).outliers.tolist() == [3]
    layer.set_input_norm(None)
    assert torch.equal(layer(x), single)
    off = ActivationConfig(cfg.D, cfg.K, cfg.gain_bits, outlier_ratio=None)
    assert code_activations(x, off, layer.signs, input_norm=median).outliers is None


@requires_cuda
@pytest.mark.parametrize("act", ["pvq-a4.25", "pvq-a8"])
def test_cuda_massive_tokens_match_the_cpu(act):
    """On CUDA the second stage is the same composition of ops: codes of both stages bit for bit
    the CPU's, the product within float32 of the CPU's."""
    layer, _ = _layer(576, 64)
    x = _massive_tokens(576, 20, seed=3)
    layer.set_input_norm(float(x.norm(dim=-1).median()))
    layer.set_activation_config(act)
    want = code_activations(x, ACT_PRESETS[act], layer.signs, input_norm=layer.input_norm)
    out_cpu = layer(x)
    layer.cuda()
    got = code_activations(x.cuda(), ACT_PRESETS[act], layer.signs, input_norm=layer.input_norm)
    assert got.outliers.cpu().tolist() == want.outliers.tolist() == [3]
    for a, b in ((got, want), (got.residual, want.residual)):
        for field in ("pulses", "index", "gain", "scale"):
            assert torch.equal(getattr(a, field).cpu(), getattr(b, field))
    out = layer(x.cuda()).cpu()
    assert torch.allclose(out, out_cpu, rtol=1e-4, atol=1e-4 * float(out_cpu.abs().max()))


def test_outlier_ratio_and_input_norm_bad_input():
    for bad in (0.5, float("nan"), float("inf"), True, "4"):
        with pytest.raises(ValueError, match="outlier_ratio must be None or a finite number >= 1"):
            ActivationConfig(8, 29, 4, outlier_ratio=bad)
    layer, act = _layer(64, 8)
    for bad in (0.0, -1.0, float("nan"), True, "1"):
        with pytest.raises(ValueError, match="input_norm must be None or a positive finite number"):
            layer.set_input_norm(bad)
        with pytest.raises(ValueError, match="input_norm must be None or a positive finite number"):
            code_activations(torch.randn(2, 64), ACT_PRESETS[act], layer.signs, input_norm=bad)
    layer.set_input_norm(2)
    layer.set_activation_config(act)
    state = layer.state_dict()
    assert state["_extra_state"]["input_norm"] == 2.0
    other = pvq_cuda.PVQLinear(64, 8, config=layer.config)
    other.load_state_dict(state)
    assert other.input_norm == 2.0 and "outlier_ratio=4.0" in repr(other)


def test_layer_compiles_fullgraph():
    layer, act = _layer(64, 40)
    layer.set_activation_config(act)
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))
    # with a calibration norm and a massive token: the second stage without data-dependent shapes
    layer.set_input_norm(8.0)
    x[1, 5] += 300
    eager = layer(x)
    assert layer.act_outliers == 1
    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, fullgraph=True)(x), eager)


def test_layer_bad_input():
    layer, act = _layer(96, 20)
    layer.set_activation_config(act)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., in_features=96\], got \[3, 64\]"):
        layer(torch.randn(3, 64))
    with pytest.raises(TypeError, match="x must have dtype float32, float16, bfloat16; got float64"):
        layer(torch.randn(3, 96, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="for inference: no gradient flows"):
        layer(torch.randn(3, 96, requires_grad=True))
    with torch.no_grad():
        layer(torch.randn(3, 96, requires_grad=True))
    with pytest.raises(ValueError, match="x must be finite, but token 1"):
        layer(torch.tensor([[0.0] * 96, [float("nan")] * 96]))
    with pytest.raises(ValueError, match="multiple of the activation group size D=32"):
        pvq_cuda.PVQLinear.from_weight(pvq_cuda.quantize_weight(torch.randn(8, 24), pvq_cuda.PVQConfig(D=8, K=9)),
                                       act_config=ActivationConfig(32, 10, 2))
    unrotated = pvq_cuda.PVQLinear.from_weight(pvq_cuda.quantize_weight(torch.randn(8, 32),
                                                                        pvq_cuda.PVQConfig(rotate=False)))
    with pytest.raises(ValueError, match="not rotated"):
        unrotated.set_activation_config(act)
    with pytest.raises(ValueError, match="unknown activation preset 'a4'"):
        layer.set_activation_config("a4")
    with pytest.raises(TypeError, match="must be an ActivationConfig, a preset name or None"):
        layer.set_activation_config(4.25)


# ---------------------------------------------------------------------------------------------
# the model and its checkpoint
# ---------------------------------------------------------------------------------------------

def test_quantize_model_installs_activation_coding(wa_model):
    model, log = wa_model
    layers = [m for m in model.modules() if isinstance(m, pvq_cuda.PVQLinear)]
    assert len(layers) == 14 and all(m.act_config == ACT_PRESETS["pvq-a6.25"] for m in layers)
    assert log["act_config"] == ACT_PRESETS["pvq-a6.25"].to_dict()
    ids = _calib(2, 20, seed=4)
    wa = _logits(model, ids)
    set_activation_coding(model, None)
    weights_only = _logits(model, ids)
    set_activation_coding(model, "pvq-a6.25")
    assert torch.equal(_logits(model, ids), wa)
    rel = float((wa - weights_only).norm() / weights_only.norm())
    assert 0 < rel < 0.05


def test_save_load_and_from_pretrained_restore_the_act_config(wa_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = wa_model
    out = pvq_cuda.save_quantized(model, tmp_path / "q")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["activation"] == {"D": 8, "K": 119, "gain_bits": 6, "outlier_ratio": 4.0}
    assert q["activation_overrides"] == {}
    norms = {n: m.input_norm for n, m in model.named_modules() if isinstance(m, pvq_cuda.PVQLinear)}
    assert q["input_norms"] == norms and all(v > 0 for v in norms.values())  # calibrated: every layer has one
    ids = _calib(2, 16, seed=9)
    want = _logits(model, ids)
    loaded = pvq_cuda.load_quantized(out)
    assert all(m.act_config == ACT_PRESETS["pvq-a6.25"] for m in loaded.modules() if isinstance(m, pvq_cuda.PVQLinear))
    assert {n: m.input_norm for n, m in loaded.named_modules() if isinstance(m, pvq_cuda.PVQLinear)} == norms
    assert torch.equal(_logits(loaded, ids), want)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert {n: m.input_norm for n, m in hf.named_modules() if isinstance(m, pvq_cuda.PVQLinear)} == norms
    assert torch.equal(_logits(hf, ids), want)
    # per-module differences are recorded as overrides, weights-only layers as null
    loaded.model.layers[0].mlp.down_proj.set_activation_config("pvq-a4.25")
    loaded.model.layers[1].self_attn.o_proj.set_activation_config(None)
    again = pvq_cuda.load_quantized(pvq_cuda.save_quantized(loaded, tmp_path / "q2"))
    q2 = json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"]
    assert q2["activation_overrides"] == {"model.layers.0.mlp.down_proj": ACT_PRESETS["pvq-a4.25"].to_dict(),
                                          "model.layers.1.self_attn.o_proj": None}
    assert again.model.layers[1].self_attn.o_proj.act_config is None
    assert torch.equal(_logits(again, ids), _logits(loaded, ids))


def test_checkpoints_without_activation_keys_load_weights_only(wa_model, tmp_path):
    model, _ = wa_model
    out = pvq_cuda.save_quantized(model, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    for key in ("activation", "activation_overrides"):
        del cfg["quantization_config"][key]
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = pvq_cuda.load_quantized(out)
    assert all(m.act_config is None for m in loaded.modules() if isinstance(m, pvq_cuda.PVQLinear))
    cfg["quantization_config"]["activation"] = {"D": 8, "K": 500, "gain_bits": 6}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not describe a valid activation config: .*K must be"):
        pvq_cuda.load_quantized(out)
    # input_norms: absent reads as none (one stage per token); a bad value is refused by name
    cfg["quantization_config"]["activation"] = {"D": 8, "K": 119, "gain_bits": 6}  # no outlier_ratio: the default
    del cfg["quantization_config"]["input_norms"]
    (out / "config.json").write_text(json.dumps(cfg))
    loaded = pvq_cuda.load_quantized(out)
    layers = [m for m in loaded.modules() if isinstance(m, pvq_cuda.PVQLinear)]
    assert all(m.input_norm is None and m.act_config == ACT_PRESETS["pvq-a6.25"] for m in layers)
    for bad in (-1.0, 0, "2", True, None):
        cfg["quantization_config"]["input_norms"] = {"model.layers.0.mlp.down_proj": bad}
        (out / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="input_norms must map module names to positive finite numbers"):
            pvq_cuda.load_quantized(out)


def test_quantize_model_act_config_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="method 'rtn-int4' leaves dense layers"):
        pvq_cuda.quantize_model(model, None, method="rtn-int4", act_config="pvq-a4.25", progress=False)
    with pytest.raises(ValueError, match="unknown activation preset 'pvq-a3'"):
        pvq_cuda.quantize_model(model, None, method="pvq-datafree", act_config="pvq-a3", progress=False)
    with pytest.raises(ValueError, match="rotate=True"):
        pvq_cuda.quantize_model(model, None, pvq_cuda.PVQConfig(rotate=False), method="pvq-datafree",
                                act_config="pvq-a4.25", progress=False)
    assert not any(isinstance(m, pvq_cuda.PVQLinear) for m in model.modules())  # nothing was done
    with pytest.raises(ValueError, match="has no PVQLinear layer"):
        set_activation_coding(model, "pvq-a4.25")


def test_quantize_models_takes_act_config_per_run():
    models = [tiny_model(), tiny_model()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logs = pvq_cuda.quantize_models(models, _calib(), [{"act_config": "pvq-a8"}, {}], progress=False, batch_size=4,
                                        fp_targets=True)
    assert logs[0]["act_config"] == ACT_PRESETS["pvq-a8"].to_dict() and logs[1]["act_config"] is None
    acts = [{m.act_config for m in model.modules() if isinstance(m, pvq_cuda.PVQLinear)} for model in models]
    assert acts == [{ACT_PRESETS["pvq-a8"]}, {None}]


# ---------------------------------------------------------------------------------------------
# INT activation baselines
# ---------------------------------------------------------------------------------------------

def test_default_int_baselines_meet_each_pvq_preset_at_its_rate():
    """compare --act's default INT rows include one within 0.03 bits per activation of each PVQ
    preset the table shows (at SmolLM2's widths), so "beats INT at equal bits" is a row-to-row
    comparison, not one across a quarter bit."""
    from pvq_cuda.apps.wa import EQUAL_RATE, WA_ACTIVATIONS, WA_BASELINES

    for n in (576, 1536):
        int_rates = [parse_activation_baseline(b).bits_per_activation(n) for b in WA_BASELINES]
        for a in WA_ACTIVATIONS:
            rate = ACT_PRESETS[a].bits_per_activation(n)
            assert min(abs(r - rate) for r in int_rates) < min(0.03, EQUAL_RATE), (a, n, rate, int_rates)


def test_int_baselines_quantize_as_stated():
    x = torch.randn(6, 64) * torch.tensor([0.01, 1, 10, 100, 1e3, 0]).unsqueeze(1)
    for name, step_of in (("int8-token", lambda v: v.abs().amax(-1, keepdim=True) / 127),
                          ("int4-g8", lambda v: v.view(6, 8, 8).abs().amax(-1, keepdim=True) / 7)):
        q = parse_activation_baseline(name)
        out = q.quantize(x)
        step = step_of(x).half().float()
        if q.group:
            err = (out - x).view(6, 8, 8).abs()
        else:
            err = (out - x).abs()
        assert bool((err <= step / 2 * (1 + 1e-3) + 1e-12).all())  # round to nearest on the fp16 step
        levels = (out.view(*step.shape[:-1], -1) / step if q.group else out / step).nan_to_num(0).round()
        assert float(levels.abs().max()) == 2 ** (q.bits - 1) - 1  # the largest value lands on the top level
    assert torch.equal(parse_activation_baseline("int4-token").quantize(torch.zeros(2, 16)), torch.zeros(2, 16))
    assert parse_activation_baseline("int8-token").bits_per_activation(576) == pytest.approx(8 + 16 / 576)
    assert parse_activation_baseline("int4-g8").bits_per_activation(576) == 6
    for bad in ("int1-token", "int8", "fp8-token", "int4-g0"):
        with pytest.raises(ValueError, match="activation baseline"):
            parse_activation_baseline(bad)


def test_simulated_activations_hook_the_rotated_basis(wa_model):
    model, _ = wa_model
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    set_activation_coding(model, None)
    try:
        with simulated_activations(model, "int4-token") as q:
            out = layer(x)
        want = nn.functional.linear(q.quantize(pvq_cuda.hadamard_transform(x, layer.signs)),
                                    layer.weight.dequantize(rotated=True), layer.bias)
        assert torch.allclose(out, want, rtol=1e-4, atol=1e-5)
        assert not layer._forward_pre_hooks  # removed on exit
        set_activation_coding(model, "pvq-a4.25")
        with pytest.raises(ValueError, match="already codes its activations"):
            with simulated_activations(model, "int8-token"):
                pass
    finally:
        set_activation_coding(model, "pvq-a6.25")


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------

SMALL = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_tiny_model_dir(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


def test_compare_act_writes_table_plot_and_json(tiny, tmp_path, capsys):
    from pvq_cuda.apps.cli import main

    rc = main(["compare", "--act", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--config", "pvq-4.25", "--act-config", "pvq-a4.25,pvq-a8", "--act-baselines", "int4-token,int8-g8",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads((tmp_path / "wa_model.json").read_text())
    rows = [(r["weights"], r["activations"]) for r in result["results"]]
    assert rows == [("fp32", "fp32"), ("pvq-4.25", "A16"), ("pvq-4.25", "pvq-a4.25"), ("pvq-4.25", "pvq-a8"),
                    ("pvq-4.25", "int4-token"), ("pvq-4.25", "int8-g8")]
    bpa = {r["activations"]: r["bpa"] for r in result["results"]}
    # tiny: q/k/v/o/gate/up take 64 values, down 128 (2 of 14 layers): weighted by input size
    assert bpa["pvq-a4.25"] == pytest.approx(4.25 + 16 * (12 + 2) / (12 * 64 + 2 * 128))
    assert bpa["int8-g8"] == 10 and bpa["A16"] is None
    assert all(r["ratio_se"] > 0 for r in result["results"][1:])
    assert (tmp_path / "wa_model.png").stat().st_size > 1000 and "| pvq-4.25 | INT8 g8 |" in out
    md = (tmp_path / "wa_model.md").read_text()
    assert "integer W+A kernel" in md and "## PVQ against INT at equal bits per activation" in md
    # KL from the A16 model: none on the reference rows, positive with a standard error on the rest,
    # one value per evaluation window, and smaller at 8 bits than at 4
    kl = {r["activations"]: r for r in result["results"]}
    assert kl["fp32"]["kl"] is None and kl["A16"]["kl"] is None
    for name in ("pvq-a4.25", "pvq-a8", "int4-token", "int8-g8"):
        assert kl[name]["kl"] > 0 and kl[name]["kl_se"] > 0 and len(kl[name]["window_kl"]) == 2, name
    assert kl["pvq-a8"]["kl"] < kl["pvq-a4.25"]["kl"] and kl["int8-g8"]["kl"] < kl["int4-token"]["kl"]


def test_equal_rate_pairs_match_rows_of_the_same_weights_and_rate():
    from pvq_cuda.apps.wa import WARow, equal_rate_pairs

    def row(weights, act, family, bpa, window_kl):
        return WARow(weights, act, act, family, 3.25, bpa, 20.0, 1.1, 0.01, 1.0, {}, sum(window_kl) / len(window_kl),
                     None, window_kl)

    rows = [WARow("pvq-3.25", "A16", "A16", "A16", 3.25, None, 20.0, 1.1, 0.01, None),
            row("pvq-3.25", "pvq-a8", "PVQ", 8.022, [1.0, 2.0, 3.0]),
            row("pvq-3.25", "int8-token", "INT per-token", 8.022, [2.0, 2.5, 5.0]),
            row("pvq-3.25", "int4-g64", "INT per-group", 4.25, [9.0, 9.0, 9.0]),   # another rate
            row("pvq-4.25", "int8-token", "INT per-token", 8.022, [0.0, 0.0, 0.0])]  # other weights
    (p, q, diff, se), = equal_rate_pairs(rows)
    assert (p.activations, q.activations, q.weights) == ("pvq-a8", "int8-token", "pvq-3.25")
    assert diff == pytest.approx(-3.5 / 3) and se == pytest.approx(float(torch.tensor(
        [-1.0, -0.5, -2.0], dtype=torch.float64).std()) / 3 ** 0.5)


def test_quantize_act_config_saves_and_evals(tiny, tmp_path, capsys):
    from pvq_cuda.apps.cli import main

    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), *SMALL,
               "--baselines", "none", "--act-config", "pvq-a8.5", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "activations D=2, K=127, 8 gain bits" in captured.out
    ppl = float(captured.out.strip().splitlines()[-1].split()[1])
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["activation"] == ACT_PRESETS["pvq-a8.5"].to_dict()
    rc = main(["eval", "--model", str(out), "--calib", str(tiny / "text.txt"), *SMALL[2:-1]])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0 and float(last.split()[1]) == pytest.approx(ppl, rel=1e-3)
