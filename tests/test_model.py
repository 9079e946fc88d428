"""quantize_model, save_quantized and load_quantized on a tiny random Llama (CPU, no network)."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from pvq_cuda.quantization.methods import h_loss, parse_method  # noqa: E402
from tiny_llama import VOCAB, logits, quantize_quietly, random_ids, tiny_model  # noqa: E402



def _calib(n=6, seqlen=24, seed=1):
    return random_ids(n, seqlen, seed)


_logits = logits


def _quantize(model, **kw):
    return quantize_quietly(model, _calib(), **kw)


@pytest.fixture(scope="module")
def quantized():
    model = tiny_model()
    log = _quantize(model, calibration_info={"source": "random ids"})
    return model, log


def test_quantize_replaces_block_linears(quantized):
    model, log = quantized
    names = [n for n, m in model.named_modules() if isinstance(m, pvq_cuda.PVQLinear)]
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert [e["name"] for e in log["layers"]][:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert all(e["loss_kind"] == "hessian" and 0 < e["loss"] < 1 and e["seconds"] >= 0 for e in log["layers"])
    assert 3.25 < log["bpw"] < 4  # small layers: row scales and tile padding weigh more than at 4096 columns
    assert log["calibration"]["tokens"] == 6 * 24


def test_save_load_gives_identical_logits(quantized, tmp_path):
    model, _ = quantized
    out = pvq_cuda.save_quantized(model, tmp_path / "q")
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "pvq" and q["format_version"] == 1
    assert (q["D"], q["K"], q["scale_bits"], q["rotate"]) == (16, 30, 2, True)
    assert q["modules_to_not_convert"] == ["lm_head"] and q["module_overrides"] == {}
    assert q["calibration"]["source"] == "random ids" and q["calibration"]["damp"] == 0.01
    assert (out / "model.safetensors").is_file()
    assert pvq_cuda.read_metadata(out / "model.safetensors")["quant_method"] == "pvq"
    loaded = pvq_cuda.load_quantized(out)
    ids = _calib(3, 20, seed=7)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_sharded_save_and_ignore(tmp_path):
    model = tiny_model(seed=3)
    _quantize(model, ignore=r"mlp\.down_proj", overrides={r"layers\.1\.self_attn\.o_proj": "pvq-4.25"})
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert model.model.layers[1].self_attn.o_proj.config == pvq_cuda.PVQConfig.preset("pvq-4.25")
    out = pvq_cuda.save_quantized(model, tmp_path / "q", calibration_info={"source": "x"}, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in q["modules_to_not_convert"]
    assert list(q["module_overrides"]) == ["model.layers.1.self_attn.o_proj"]
    assert q["calibration"]["source"] == "x" and q["calibration"]["tokens"] == 6 * 24  # merged with the run's
    loaded = pvq_cuda.load_quantized(out)
    assert isinstance(loaded.model.layers[1].mlp.down_proj, nn.Linear)
    ids = _calib(2, 16, seed=5)
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))


def test_resume_skips_finished_blocks(tmp_path):
    a = tiny_model()
    log_a = _quantize(a, resume_dir=tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").glob("block_*")) == ["block_0000.safetensors",
                                                                        "block_0001.safetensors"]
    (tmp_path / "r" / "block_0001.safetensors").unlink()  # as if the run had stopped after block 0
    b = tiny_model()
    log_b = _quantize(b, resume_dir=tmp_path / "r")
    assert [e["loss"] for e in log_b["layers"]] == [e["loss"] for e in log_a["layers"]]
    # the calibration input norms (the activation coder's outlier test) come back from the resumed blocks
    norms = [(n, m.input_norm) for n, m in a.named_modules() if isinstance(m, pvq_cuda.PVQLinear)]
    assert norms and all(v is not None and v > 0 for _, v in norms)
    assert [(n, m.input_norm) for n, m in b.named_modules() if isinstance(m, pvq_cuda.PVQLinear)] == norms
    ids = _calib(2, 16, seed=9)
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    with pytest.raises(ValueError, match="resume_dir .* other settings"):
        pvq_cuda.quantize_model(tiny_model(), _calib(), "pvq-2.25", progress=False, resume_dir=tmp_path / "r")


def test_offload_matches(quantized):
    model, _ = quantized
    b = tiny_model()
    _quantize(b, offload=True, device="cpu")
    ids = _calib(2, 16, seed=11)
    assert torch.equal(_logits(model, ids), _logits(b, ids))


def test_data_free_needs_no_calibration():
    model = tiny_model()
    log = pvq_cuda.quantize_model(model, None, "pvq-2.25", method="pvq-datafree", progress=False)
    assert all(e["loss_kind"] == "weight" for e in log["layers"]) and len(log["layers"]) == 14


def test_method_names():
    assert parse_method("gptq-rot-int3") == parse_method("GPTQ-ROT-INT3-g128")
    m = parse_method("rtn-int2-g64")
    assert (m.kind, m.bits, m.group, m.hessian, m.simulated) == ("rtn", 2, 64, False, True)
    with pytest.raises(ValueError, match="method 'awq-int4' is not known"):
        parse_method("awq-int4")


def test_bad_inputs(tmp_path):
    from transformers import LlamaModel

    with pytest.raises(TypeError, match="causal LM"):
        pvq_cuda.quantize_model(LlamaModel(tiny_model().config), _calib(), progress=False)
    with pytest.raises(TypeError, match="causal LM"):
        pvq_cuda.quantize_model(nn.Linear(8, 8), _calib(), progress=False)
    with pytest.raises(ValueError, match="calibration is required"):
        pvq_cuda.quantize_model(tiny_model(), None, progress=False)
    with pytest.raises(ValueError, match="outside"):
        pvq_cuda.quantize_model(tiny_model(), _calib() + VOCAB, progress=False)
    with pytest.raises(TypeError, match="integer token ids"):
        pvq_cuda.quantize_model(tiny_model(), _calib().float(), progress=False)
    with pytest.raises(ValueError, match="ignore .* not a valid regex"):
        pvq_cuda.quantize_model(tiny_model(), _calib(), ignore="(", progress=False)
    with pytest.raises(ValueError, match="no linear layer is left"):
        pvq_cuda.quantize_model(tiny_model(), _calib(), ignore=".", progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        pvq_cuda.quantize_model(tiny_model(), _calib(), "pvq-9", progress=False)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        pvq_cuda.load_quantized(tmp_path / "missing")
    tiny_model().save_pretrained(str(tmp_path / "dense"))
    with pytest.raises(ValueError, match="quant_method 'pvq'"):
        pvq_cuda.load_quantized(tmp_path / "dense")
    with pytest.raises(ValueError, match="no PVQLinear"):
        pvq_cuda.save_quantized(tiny_model(), tmp_path / "x")


def test_bad_hessian_is_rejected():
    W = torch.randn(32, 64)
    cfg = pvq_cuda.PVQConfig.preset("pvq-3.25")
    with pytest.raises(ValueError, match="hessian"):
        pvq_cuda.quantize_weight(W, cfg, hessian=torch.eye(32))
    H = torch.eye(64)
    H[3, 3] = float("nan")
    with pytest.raises(ValueError, match="hessian"):
        pvq_cuda.quantize_weight(W, cfg, hessian=H)


def test_hessian_aware_beats_data_free_on_correlated_inputs():
    gen = torch.Generator().manual_seed(0)
    n, N, tokens = 256, 128, 4096
    # Correlated inputs: a few strong directions plus isotropic noise, as in real activations.
    mix = torch.randn(16, n, generator=gen) * 3
    X = torch.randn(tokens, 16, generator=gen) @ mix + 0.3 * torch.randn(tokens, n, generator=gen)
    H = pvq_cuda.quantization.hessian.damp_hessian(2 / tokens * X.T @ X, 0.01)
    W = torch.randn(N, n, generator=gen) / n**0.5
    cfg = pvq_cuda.PVQConfig.preset("pvq-3.25")
    free = h_loss(W, pvq_cuda.quantize_weight(W, cfg).dequantize(), H)
    aware = h_loss(W, pvq_cuda.quantize_weight(W, cfg, hessian=H).dequantize(), H)
    assert aware < 0.8 * free, (aware, free)


def test_baselines_run_through_the_pipeline():
    for method in ("rtn-int4", "gptq-int3", "gptq-rot-int3"):
        model = tiny_model()
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        log = pvq_cuda.quantize_model(model, _calib(), method=method, progress=False)
        layer = model.model.layers[0].mlp.up_proj
        assert isinstance(layer, nn.Linear) and not torch.equal(layer.weight, before)
        assert len(log["layers"]) == 14 and log["bpw"] > 2


def test_fp_target_weight_is_the_least_squares_target():
    """W_t minimizes ‖W X̃ − W_t X‖² (+ the damping term) and is W itself when X̃ = X."""
    from pvq_cuda.quantization.hessian import damp_hessian
    from pvq_cuda.pipeline import fp_target_weight

    gen = torch.Generator().manual_seed(5)
    X = torch.randn(500, 24, generator=gen).double()
    Xf = X + 0.1 * torch.randn(500, 24, generator=gen).double()  # the fp model's inputs
    W = torch.randn(10, 24, generator=gen).double()
    H = damp_hessian(2 / 500 * X.T @ X, 0.0)
    assert torch.allclose(fp_target_weight(W, torch.zeros(24, 24), H), W)
    Wt = fp_target_weight(W, 2 / 500 * (Xf - X).T @ X, H)
    lstsq = torch.linalg.lstsq(X, Xf @ W.T).solution.T
    torch.testing.assert_close(Wt, lstsq, rtol=1e-8, atol=1e-8)
    # An H that is symmetric but not positive definite takes the LU path: still W + W S H⁻¹.
    S = torch.randn(24, 24, generator=gen).double()
    H_indef = H - 1.5 * H.diagonal().mean() * torch.eye(24, dtype=torch.float64)
    assert bool((torch.linalg.eigvalsh(H_indef) < 0).any())
    torch.testing.assert_close(fp_target_weight(W, S, H_indef), W + W @ S @ torch.linalg.inv(H_indef),
                               rtol=1e-8, atol=1e-8)


def test_fp_targets_pipeline_and_resume(tmp_path, monkeypatch):
    """fp_targets quantizes toward the fp model: the end-to-end output error on the calibration
    ids is no larger than without it (tiny model, same codes budget), and resume continues it."""
    ids = _calib()
    ref = _logits(tiny_model(), ids)
    errs = {}
    for on in (False, True):
        model = tiny_model()
        log = _quantize(model, fp_targets=on)
        assert log["fp_targets"] is on
        errs[on] = float((_logits(model, ids) - ref).square().mean())
    assert errs[True] < 1.1 * errs[False]
    # Resume: a run stopped in block 1 continues from the saved fp and quantized activations.
    full = tiny_model()
    _quantize(full, fp_targets=True)
    quantize_layer = pvq_cuda.pipeline.run.Run.quantize_layer

    def stop_in_block_1(self, *args, **kw):
        if args[5] == 1:  # (block, prefix, rel, H, seconds_h, block_index)
            raise KeyboardInterrupt
        return quantize_layer(self, *args, **kw)

    monkeypatch.setattr(pvq_cuda.pipeline.run.Run, "quantize_layer", stop_in_block_1)
    with pytest.raises(KeyboardInterrupt):
        _quantize(tiny_model(), fp_targets=True, resume_dir=tmp_path / "r")
    monkeypatch.setattr(pvq_cuda.pipeline.run.Run, "quantize_layer", quantize_layer)
    assert (tmp_path / "r" / "block_0000.safetensors").exists()
    assert not (tmp_path / "r" / "block_0001.safetensors").exists()
    again = tiny_model()
    _quantize(again, fp_targets=True, resume_dir=tmp_path / "r")
    torch.testing.assert_close(_logits(again, ids), _logits(full, ids))
    (tmp_path / "r" / "activations.safetensors").unlink()
    (tmp_path / "r" / "block_0001.safetensors").unlink()
    with pytest.raises(ValueError, match="fp_targets needs"):
        _quantize(tiny_model(), fp_targets=True, resume_dir=tmp_path / "r")


@pytest.mark.parametrize("fp_targets", [False, True])
def test_staged_llama_blocks_are_exact(monkeypatch, fp_targets):
    """The pipeline's staged run of Llama blocks (each group's inputs made without rerunning
    earlier layers) quantizes to exactly the model that the generic path (the block run up to
    each group) gives."""
    from pvq_cuda.pipeline.llama import LlamaFlow as _LlamaFlow

    probes = []
    probe = _LlamaFlow.probe
    monkeypatch.setattr(_LlamaFlow, "probe", classmethod(lambda cls, *a: probes.append(probe(*a)) or probes[-1]))
    fast = tiny_model()
    fast_log = _quantize(fast, fp_targets=fp_targets)
    assert probes == [True]  # probed once per run, and the tiny Llama passes
    monkeypatch.setattr(_LlamaFlow, "probe", classmethod(lambda cls, *a: False))
    slow = tiny_model()
    slow_log = _quantize(slow, fp_targets=fp_targets)
    ids = _calib(seed=9)
    assert torch.equal(_logits(fast, ids), _logits(slow, ids))
    assert [e["loss"] for e in fast_log["layers"]] == [e["loss"] for e in slow_log["layers"]]


def test_staged_probe_rejects_other_block_layouts():
    """The probe passes the tiny Llama's block and fails blocks that differ from the Llama layout:
    a forward on another input, a parallel attention/MLP residual, an MLP without its gate, a
    forward that skips the linears."""
    from pvq_cuda.pipeline.llama import LlamaFlow as _LlamaFlow

    block = tiny_model().model.layers[0].eval()
    h = torch.randn(2, 16, block.input_layernorm.weight.numel())
    head_dim = block.self_attn.head_dim
    cos_sin = (torch.ones(2, 16, head_dim), torch.zeros(2, 16, head_dim))

    def parallel(hidden_states, **kw):  # GPT-J / Cohere style: attention and MLP read the same input
        a, _ = block.self_attn(hidden_states=block.input_layernorm(hidden_states), attention_mask=None, **kw)
        return hidden_states + a + block.mlp(block.post_attention_layernorm(hidden_states))

    with torch.no_grad():
        assert _LlamaFlow.probe(block, h, lambda: block(h, position_embeddings=cos_sin))
        assert not _LlamaFlow.probe(block, h, lambda: block(h * 1.5, position_embeddings=cos_sin))
        assert not _LlamaFlow.probe(block, h, lambda: parallel(h, position_embeddings=cos_sin))
        mlp_forward = block.mlp.forward
        block.mlp.forward = lambda x: block.mlp.down_proj(block.mlp.up_proj(x))
        assert not _LlamaFlow.probe(block, h, lambda: block(h, position_embeddings=cos_sin))
        block.mlp.forward = mlp_forward
        assert _LlamaFlow.probe(block, h, lambda: block(h, position_embeddings=cos_sin))
        # a forward that never calls the block's linears
        assert not _LlamaFlow.probe(block, h, lambda: block.input_layernorm(h))


def test_quantize_models_matches_separate_runs():
    """quantize_models gives each model exactly what its own quantize_model call gives; the runs
    with fp targets share one fp pass and say so in their logs."""
    specs = [{"method": "pvq", "config": "pvq-2.25"}, {"method": "gptq-int4"}, {"method": "pvq-datafree"},
             {"method": "pvq", "config": "pvq-4.25", "act_order": True}]
    together = [tiny_model() for _ in specs]
    logs = pvq_cuda.quantize_models(together, _calib(), specs, fp_targets=True, progress=False, batch_size=4)
    ids = _calib(seed=9)
    for model, log, spec in zip(together, logs, specs):
        alone = tiny_model()
        ref = pvq_cuda.quantize_model(alone, _calib(), spec.get("config"), fp_targets=True, progress=False,
                                      batch_size=4, **{k: v for k, v in spec.items() if k != "config"})
        assert torch.equal(_logits(model, ids), _logits(alone, ids)), spec
        assert [e["loss"] for e in log["layers"]] == [e["loss"] for e in ref["layers"]]
        assert log["method"] == ref["method"] and log["bpw"] == ref["bpw"]
        shared = parse_method(spec["method"]).hessian
        assert ("shared_seconds" in log) == shared
        if shared:
            assert 0 < log["shared_seconds"] < log["seconds"]
    assert together[0].config.quantization_config["calibration"]["fp_targets"] is True


def test_quantize_models_bad_input():
    a, b = tiny_model(), tiny_model()
    with pytest.raises(ValueError, match="distinct objects"):
        pvq_cuda.quantize_models([a, a], _calib(), progress=False)
    with pytest.raises(ValueError, match="one mapping per model"):
        pvq_cuda.quantize_models([a, b], _calib(), [{}], progress=False)
    with pytest.raises(TypeError, match="resume_dir is not supported"):
        pvq_cuda.quantize_models([a, b], _calib(), resume_dir="x", progress=False)
    with pytest.raises(TypeError, match=r"runs\[1\] sets \['damp'\]"):
        pvq_cuda.quantize_models([a, b], _calib(), [{}, {"damp": 0.1}], progress=False)
    with pytest.raises(TypeError, match="unexpected keyword"):
        pvq_cuda.quantize_models([a, b], _calib(), fp_target=True, progress=False)
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight.mul_(2)
    with pytest.raises(ValueError, match=r"models\[1\] is not a copy of models\[0\] \(block 1 differs\)"):
        pvq_cuda.quantize_models([a, b], _calib(), fp_targets=True, progress=False, batch_size=4)


def test_refine_passes_through_the_pipeline(tmp_path):
    """refine_passes reaches every layer (lower summed layer loss), is logged and stored in the
    quantization_config, and is part of the resume fingerprint."""
    plain = _quantize(tiny_model())
    model = tiny_model()
    refined = _quantize(model, refine_passes=2, resume_dir=tmp_path / "r")
    assert refined["refine_passes"] == 2 and plain["refine_passes"] == 0
    assert model.config.quantization_config["calibration"]["refine_passes"] == 2
    assert sum(e["loss"] for e in refined["layers"]) < sum(e["loss"] for e in plain["layers"])
    with pytest.raises(ValueError, match="resume_dir .* other settings"):
        _quantize(tiny_model(), refine_passes=1, resume_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="refine_passes must be an int >= 0"):
        _quantize(tiny_model(), refine_passes=-1)


def test_quantize_models_shows_one_progress_bar(capsys):
    """All runs of quantize_models count on one bar (separate bars would interleave their lines)."""
    pvq_cuda.quantize_models([tiny_model(), tiny_model()], None, [{"method": "pvq-datafree"}, {"method": "rtn-int4"}])
    err = capsys.readouterr().err
    assert "28/28" in err and "14/14" not in err  # 2 runs x 14 linears, counted together
    assert "pvq-datafree: model.layers." in err and "rtn-int4: model.layers." in err
