"""quantize_model(..., tune_epochs=E): the block's linears not yet quantized are trained between
its groups (pipeline/tune.py)."""

from __future__ import annotations

import pytest
import torch

import pvq_cuda
from pvq_cuda.pipeline.tune import relative_error, tune_pending
from tiny_arches import tiny_arch_model
from tiny_llama import logits, quantize_quietly, random_ids, tiny_model

ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]


def _calib(seed: int = 1):
    return random_ids(8, 24, seed)


def test_tuning_trains_only_the_linears_still_to_be_quantized():
    """After each group, exactly the block's later linears are trained (a layer kept by ignore
    never, nor the norms); the first group is quantized from the original weights."""
    plain, tuned = tiny_model(), tiny_model()
    original = tiny_model()
    ignore = r"layers\.1\.mlp\.up_proj"
    plain_log = quantize_quietly(plain, _calib(), ignore=ignore)
    log = quantize_quietly(tuned, _calib(), ignore=ignore, tune_epochs=2, tune_lr=3e-2)
    later = ["self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expect = [(0, later), (0, later[1:]), (0, later[3:]),
              (1, ["self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]), (1, ["mlp.gate_proj", "mlp.down_proj"]),
              (1, ["mlp.down_proj"])]
    assert [(e["block"], e["trained"]) for e in log["tune"]] == expect
    assert log["tune_epochs"] == 2 and log["tune_lr"] == 3e-2 and plain_log["tune_epochs"] == 0
    assert "tune" not in plain_log
    state, ref = tuned.state_dict(), original.state_dict()
    kept = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(state[kept], ref[kept])
    norms = [k for k in ref if "norm" in k]
    assert norms and all(torch.equal(state[k], ref[k]) for k in norms)
    # Block 0's q/k/v are quantized before any tuning: the same codes as without it; its later
    # layers come from trained weights.
    blocks_t, blocks_p = tuned.model.layers, plain.model.layers
    for n in ATTN:
        assert torch.equal(blocks_t[0].get_submodule(n).codes, blocks_p[0].get_submodule(n).codes), n
    assert not torch.equal(blocks_t[0].mlp.gate_proj.codes, blocks_p[0].mlp.gate_proj.codes)


def test_tuning_lowers_the_blocks_error_and_the_models():
    """Each group's training lowers the block's output error on the calibration chunks, and the
    quantized model's logits end closer to the unquantized model's on them than without tuning."""
    ids = _calib()
    ref = logits(tiny_model(), ids)
    errs = {}
    for epochs in (0, 4):
        model = tiny_model()
        log = quantize_quietly(model, ids, "pvq-2.25", tune_epochs=epochs, tune_lr=3e-2)
        errs[epochs] = float(relative_error(logits(model, ids), ref))
        if epochs:
            assert all(e["loss_after"] < e["loss_before"] for e in log["tune"]), log["tune"]
    assert errs[4] < errs[0]


def test_tune_pending_updates_only_the_named_linears_and_restores_grad_flags():
    block = tiny_model().model.layers[0]
    h = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3))
    cos_sin = (torch.ones(2, 12, block.self_attn.head_dim), torch.zeros(2, 12, block.self_attn.head_dim))

    def forward(c):
        return block(h[c:c + 1], position_embeddings=(cos_sin[0][c:c + 1], cos_sin[1][c:c + 1]))

    with torch.no_grad():
        targets = [forward(c)[0] * 1.1 for c in range(2)]  # a target the block does not meet
    before = {k: v.clone() for k, v in block.state_dict().items()}
    block.self_attn.q_proj.weight.requires_grad_(False)
    with torch.no_grad():  # the pipeline calls it inside no_grad
        losses = tune_pending(block, ["mlp.down_proj"], forward, targets, epochs=3, lr=3e-2)
    assert losses is not None and losses[1] < losses[0]
    after = block.state_dict()
    assert [k for k in before if not torch.equal(before[k], after[k])] == ["mlp.down_proj.weight"]
    assert not block.self_attn.q_proj.weight.requires_grad and block.mlp.up_proj.weight.requires_grad
    assert all(p.grad is None for p in block.parameters())
    assert tune_pending(block, [], forward, targets, epochs=3, lr=3e-2) is None
    # An epoch that makes the block worse is not kept: at a huge learning rate none is better.
    before = {k: v.clone() for k, v in block.state_dict().items()}
    losses = tune_pending(block, ["mlp.up_proj", "mlp.down_proj"], forward, targets, epochs=2, lr=50.0)
    assert losses is not None and losses[1] == losses[0]
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())


def test_the_learning_rate_is_relative_to_each_layers_weight_rms():
    """Adam's first step moves every weight by lr (its normalized gradient's sign): here lr times
    the layer's weight RMS, so layers of any scale move by the same share of it."""
    block = tiny_model().model.layers[0]
    with torch.no_grad():
        block.mlp.down_proj.weight.mul_(5.0)
    h = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(4))
    cos_sin = (torch.ones(1, 12, block.self_attn.head_dim), torch.zeros(1, 12, block.self_attn.head_dim))

    def forward(c):
        return block(h, position_embeddings=cos_sin)

    with torch.no_grad():
        targets = [forward(0)[0] * 1.1]
    names = ["mlp.up_proj", "mlp.down_proj"]
    before = {n: block.get_submodule(n).weight.detach().clone() for n in names}
    tune_pending(block, names, forward, targets, epochs=1, lr=1e-2)
    for n in names:
        rms = float(before[n].square().mean().sqrt())
        step = (block.get_submodule(n).weight.detach() - before[n]).abs().max()
        assert float(step) == pytest.approx(1e-2 * rms, rel=1e-3), n


def test_tuning_with_fp_targets_in_lockstep_matches_separate_runs():
    """With fp targets the training targets are the unquantized block's outputs on the fp stream,
    which quantize_models' followers take from the lead's shared pass: the same models as alone."""
    specs = [{"config": "pvq-3.25"}, {"method": "gptq-int4"}]
    together = [tiny_model() for _ in specs]
    pvq_cuda.quantize_models(together, _calib(), specs, fp_targets=True, tune_epochs=1, tune_lr=3e-2,
                             progress=False, batch_size=4)
    ids = _calib(seed=9)
    for model, spec in zip(together, specs):
        alone = tiny_model()
        pvq_cuda.quantize_model(alone, _calib(), spec.get("config"), method=spec.get("method", "pvq"),
                                fp_targets=True, tune_epochs=1, tune_lr=3e-2, progress=False, batch_size=4)
        assert torch.equal(logits(model, ids), logits(alone, ids)), spec


def test_tuning_on_the_generic_path():
    """Blocks that take the generic path (Phi-3: fused qkv_proj and gate_up_proj) are tuned too."""
    model = tiny_arch_model("phi3")
    log = quantize_quietly(model, _calib(), tune_epochs=1, tune_lr=3e-2)
    assert {e["path"] for e in log["layers"]} == {"generic"}
    assert [e["trained"] for e in log["tune"] if e["block"] == 0] == [
        ["self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"], ["mlp.gate_up_proj", "mlp.down_proj"],
        ["mlp.down_proj"]]


def test_resumed_log_lists_the_tuning_of_every_block(tmp_path):
    """A resumed run's log holds the tuning of the blocks it took from resume_dir too, as the
    run that quantized them logged it."""
    first = quantize_quietly(tiny_model(), _calib(), tune_epochs=1, resume_dir=tmp_path / "r")
    (tmp_path / "r" / "block_0001.safetensors").unlink()  # as if the run had stopped after block 0
    resumed = quantize_quietly(tiny_model(), _calib(), tune_epochs=1, resume_dir=tmp_path / "r")
    assert {e["block"] for e in first["tune"]} == {0, 1}
    strip = lambda log: [(e["block"], e["trained"]) for e in log["tune"]]  # noqa: E731
    assert strip(resumed) == strip(first)
    block_0 = [e for e in first["tune"] if e["block"] == 0]
    assert resumed["tune"][:len(block_0)] == block_0  # given back as logged, seconds included
    for a, b in zip(first["tune"], resumed["tune"]):
        assert b["loss_after"] == pytest.approx(a["loss_after"], rel=1e-5)


def test_tuning_is_part_of_the_resume_fingerprint(tmp_path):
    quantize_quietly(tiny_model(), _calib(), tune_epochs=1, resume_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="resume_dir .* other settings"):
        quantize_quietly(tiny_model(), _calib(), resume_dir=tmp_path / "r")
    with pytest.raises(ValueError, match="resume_dir .* other settings"):
        quantize_quietly(tiny_model(), _calib(), tune_epochs=1, tune_lr=3e-4, resume_dir=tmp_path / "r")


def test_data_free_methods_take_no_tuning():
    log = quantize_quietly(tiny_model(), None, method="rtn-int4", tune_epochs=2)
    assert log["tune_epochs"] == 0 and "tune" not in log


@pytest.mark.parametrize("kw, match", [
    (dict(tune_epochs=-1), "tune_epochs must be an int >= 0, got -1"),
    (dict(tune_epochs=True), "tune_epochs must be an int >= 0, got True"),
    (dict(tune_epochs=1.5), "tune_epochs must be an int >= 0"),
    (dict(tune_epochs=1, tune_lr=0.0), "tune_lr must be a positive number, got 0.0"),
    (dict(tune_epochs=1, tune_lr=float("nan")), "tune_lr must be a positive number"),
    (dict(tune_epochs=1, tune_lr="1e-3"), "tune_lr must be a positive number"),
])
def test_bad_tuning_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        quantize_quietly(tiny_model(), _calib(), **kw)
