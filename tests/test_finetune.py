"""finetune_scales: row scales, gain levels and norm weights trained toward the unquantized model
with the codes fixed (tiny random Llama, CPU, offline)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import pvq_cuda  # noqa: E402
from pvq_cuda.pipeline.finetune import _Teacher  # noqa: E402
from tiny_llama import logits, quantize_quietly, random_ids, tiny_model  # noqa: E402


def quantized_pair(seed: int = 0, config: str = "pvq-2.25"):
    reference = tiny_model(seed)
    model = copy.deepcopy(reference)
    quantize_quietly(model, None, config, method="pvq-datafree")
    return model, reference


def packed_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def pvq_layers(model) -> dict[str, pvq_cuda.PVQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, pvq_cuda.PVQLinear)}


def test_lowers_the_kl_and_keeps_the_codes(tmp_path):
    model, reference = quantized_pair()
    before = packed_state(model)
    ref_before = packed_state(reference)
    calib = random_ids(10, 32, seed=11)
    log = pvq_cuda.finetune_scales(model, reference, calib, steps=40, lr=1e-2, batch_size=4, held_out=2,
                                   progress=False)
    assert log["kl_train_last"] < 0.8 * log["kl_train_first"]
    assert log["kl_held_out_after"] < log["kl_held_out_before"]
    after = model.state_dict()
    for name in pvq_layers(model):
        assert torch.equal(after[f"{name}.codes"], before[f"{name}.codes"])  # the codes stay
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("row_scale"))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("levels"))
    assert any(not torch.equal(after[k], before[k]) for k in before if "norm" in k)
    for k, v in ref_before.items():  # the teacher is untouched
        assert torch.equal(reference.state_dict()[k], v)
    assert all(p.requires_grad for p in model.parameters())  # as the model came
    # what was trained is what the model now computes: the KL on the held-out windows agrees
    ids = calib[-2:]
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits(model, ids), -1), torch.log_softmax(logits(reference, ids), -1),
                                    log_target=True, reduction="none").sum(-1).mean()
    assert float(kl) == pytest.approx(log["kl_held_out_after"], rel=1e-3)
    # and it saves and loads as any PVQ model
    out = pvq_cuda.save_quantized(model, tmp_path / "ft")
    loaded = pvq_cuda.load_quantized(out)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_without_norms_only_the_packed_scales_change():
    model, reference = quantized_pair(1)
    before = packed_state(model)
    pvq_cuda.finetune_scales(model, reference, random_ids(4, 16, seed=2), steps=3, lr=1e-2, norms=False,
                             progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed and all(k.endswith(("row_scale", "levels")) for k in changed)


def test_head_trains_the_tied_embedding_as_one_tensor(tmp_path):
    """head=True: the output head's weight is trained too; with tied embeddings the input
    embedding is that same tensor, so it changes with the head and the two stay one parameter.
    The KL it reports is what the model then computes, and the added freedom fits the training
    windows better than the scales alone do."""
    model, reference = quantized_pair(8)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tiny_model ties them
    twin = copy.deepcopy(model)
    before = packed_state(model)
    calib = random_ids(10, 32, seed=15)
    log = pvq_cuda.finetune_scales(model, reference, calib, steps=30, lr=1e-2, batch_size=4, held_out=2, head=True,
                                   progress=False)
    plain = pvq_cuda.finetune_scales(twin, reference, calib, steps=30, lr=1e-2, batch_size=4, held_out=2,
                                     progress=False)
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().weight and isinstance(head, torch.nn.Parameter)
    assert not torch.equal(head, before["lm_head.weight"])
    assert torch.equal(twin.get_output_embeddings().weight, before["lm_head.weight"])  # without head: untouched
    assert log["trained_parameters"] == plain["trained_parameters"] + head.numel()
    assert log["kl_train_last"] < plain["kl_train_last"]
    after = model.state_dict()
    for name in pvq_layers(model):
        assert torch.equal(after[f"{name}.codes"], before[f"{name}.codes"])
    ids = calib[-2:]
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits(model, ids), -1), torch.log_softmax(logits(reference, ids), -1),
                                    log_target=True, reduction="none").sum(-1).mean()
    assert float(kl) == pytest.approx(log["kl_held_out_after"], rel=1e-3)
    loaded = pvq_cuda.load_quantized(pvq_cuda.save_quantized(model, tmp_path / "ft-head"))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_block_stage_leaves_the_head_in_place(monkeypatch):
    """With head=True and a block stage, the blocks are trained with the head's own parameter in
    place (the block stage does not train it, so nothing is rebuilt there); the end-to-end steps
    then train it, tied embedding and all."""
    from pvq_cuda.pipeline import finetune

    model, reference = quantized_pair(9)
    head = model.get_output_embeddings().weight
    before = head.detach().clone()
    seen = []
    real = finetune._finetune_blocks

    def watched(*args, **kwargs):
        out = real(*args, **kwargs)
        now = model.get_output_embeddings().weight
        seen.append((now is head, now is model.get_input_embeddings().weight))
        return out

    monkeypatch.setattr(finetune, "_finetune_blocks", watched)
    log = pvq_cuda.finetune_scales(model, reference, random_ids(8, 16, seed=4), steps=3, lr=1e-2, batch_size=4,
                                   block_epochs=1, head=True, progress=False)
    assert seen == [(True, True)]
    assert log["block_epochs"] == 1 and len(log["block_loss"]) == len(model.model.layers)
    assert model.get_output_embeddings().weight is head is model.get_input_embeddings().weight
    assert not torch.equal(head, before)


@pytest.mark.parametrize("head", [False, True])
def test_an_error_leaves_the_model_as_it_came(head):
    model, reference = quantized_pair(2)
    before = packed_state(model)
    norm_params = {n: p for n, p in model.named_parameters() if "norm" in n}
    embedding = model.get_input_embeddings().weight
    calls = 0

    def failing_forward(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 2:
            raise RuntimeError("teacher failed")
        return original(*args, **kwargs)

    # The teacher's head runs every step (its decoder once per window): fail in the second step.
    original = reference.lm_head.forward
    reference.lm_head.forward = failing_forward
    with pytest.raises(RuntimeError, match="teacher failed"):
        pvq_cuda.finetune_scales(model, reference, random_ids(4, 16, seed=3), steps=5, lr=1e-2, head=head,
                                 progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(dict(model.named_parameters())[n] is p for n, p in norm_params.items())
    assert model.get_input_embeddings().weight is embedding and model.get_output_embeddings().weight is embedding
    assert len(pvq_layers(model)) == 14  # the packed layers are back in place


def block_outputs(model, calib: torch.Tensor, batch_size: int) -> list[list[torch.Tensor]]:
    """Each decoder block's output on each chunk of ``batch_size`` windows, from the model's own forward."""
    outs = [[] for _ in model.model.layers]
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: outs[i].append(out[0] if isinstance(out, tuple) else out))
             for i, b in enumerate(model.model.layers)]
    try:
        for c in range(0, len(calib), batch_size):
            logits(model, calib[c:c + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return outs


def test_block_stage_measures_each_block_against_the_unquantized_stream():
    """With a vanishing learning rate nothing moves, so each block's first-epoch loss must be the
    relative squared error between the quantized model's block output (on its own stream) and the
    unquantized model's, as the two models compute them in a plain forward."""
    model, reference = quantized_pair(6)
    calib = random_ids(8, 24, seed=13)
    q, r = block_outputs(model, calib, 4), block_outputs(reference, calib, 4)
    expected = [sum(float((a - b).square().mean() / b.square().mean()) for a, b in zip(qs, rs)) / len(qs)
                for qs, rs in zip(q, r)]
    log = pvq_cuda.finetune_scales(model, reference, calib, steps=0, block_epochs=1, lr=1e-12, batch_size=4,
                                   progress=False)
    assert log["steps"] == 0 and log["kl_train_first"] is None
    assert [first for first, _ in log["block_loss"]] == pytest.approx(expected, rel=1e-3)
    assert all(e > 1e-4 for e in expected)  # the quantization error is there to be measured


def test_block_stage_lowers_each_blocks_error_and_the_kl():
    model, reference = quantized_pair(7)
    before = packed_state(model)
    calib = random_ids(10, 32, seed=14)
    log = pvq_cuda.finetune_scales(model, reference, calib, steps=0, block_epochs=4, lr=1e-2, batch_size=4,
                                   held_out=2, progress=False)
    assert len(log["block_loss"]) == len(model.model.layers)
    assert all(last < first for first, last in log["block_loss"])
    assert log["kl_held_out_after"] < log["kl_held_out_before"]
    assert log["kl_held_out_after_blocks"] == log["kl_held_out_after"]  # no end-to-end steps
    after = model.state_dict()
    for name in pvq_layers(model):
        assert torch.equal(after[f"{name}.codes"], before[f"{name}.codes"])
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("row_scale"))


def test_teacher_runs_the_decoder_once_per_window_and_gives_the_models_logits():
    reference = tiny_model(4)
    calib = random_ids(5, 16, seed=5)
    decoder_windows = []
    reference.get_decoder().register_forward_hook(lambda m, a, k, out: decoder_windows.append(len(out[0])),
                                                  with_kwargs=True)
    teacher = _Teacher(reference, calib, "cpu")
    seen = []
    for rows in ([0, 1], [1, 2], [2, 0], [4]):
        got = teacher.logits(rows)
        seen.append(list(decoder_windows))
        decoder_windows.clear()
        assert torch.equal(got, logits(reference, calib[rows]))
        decoder_windows.clear()
    assert teacher.split is not None
    # 2 for the first batch and 2 in the whole forward that checks it; then only the new windows
    assert seen == [[2, 2], [1], [], [1]]


def test_teacher_runs_whole_when_the_model_changes_logits_after_its_head():
    reference = tiny_model(5)
    calib = random_ids(3, 16, seed=6)
    original = reference.forward

    def capped(*args, **kwargs):  # as Gemma-2's final logit softcapping does
        out = original(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out

    reference.forward = capped
    teacher = _Teacher(reference, calib, "cpu")
    for rows in ([0, 1], [2]):
        assert torch.equal(teacher.logits(rows), capped(input_ids=calib[rows]).logits)
    assert teacher.split is None and not teacher.hidden


def test_bad_input():
    model, reference = quantized_pair(3)
    calib = random_ids(4, 16, seed=4)
    with pytest.raises(ValueError, match=r"steps must be a positive int \(or 0 with block_epochs\)"):
        pvq_cuda.finetune_scales(model, reference, calib, steps=0)
    with pytest.raises(ValueError, match="block_epochs must be an int >= 0"):
        pvq_cuda.finetune_scales(model, reference, calib, block_epochs=-1)
    with pytest.raises(ValueError, match=r"head must be a bool, and True only with steps > 0"):
        pvq_cuda.finetune_scales(model, reference, calib, steps=0, block_epochs=1, head=True)
    with pytest.raises(ValueError, match=r"head must be a bool"):
        pvq_cuda.finetune_scales(model, reference, calib, head="yes")
    with pytest.raises(ValueError, match="lr must be a positive number"):
        pvq_cuda.finetune_scales(model, reference, calib, lr=float("nan"))
    with pytest.raises(ValueError, match=r"held_out must be an int in \[0, 3\]"):
        pvq_cuda.finetune_scales(model, reference, calib, held_out=4)
    with pytest.raises(ValueError, match="calibration must be int64 token ids"):
        pvq_cuda.finetune_scales(model, reference, calib.float())
    with pytest.raises(ValueError, match="no PVQLinear layers"):
        pvq_cuda.finetune_scales(tiny_model(), reference, calib)


def test_sample_windows_draw_from_the_model():
    """The sampled windows are the model's own text: each token is a draw from the model's
    next-token distribution given the window so far (temperature 1), so the mean of log p(token)
    + entropy over many tokens is zero within its standard error, where a greedy or a uniform
    choice would be far off; the cached decoding agrees with a forward over the whole window."""
    from pvq_cuda.pipeline.finetune import sample_windows

    reference = tiny_model(5)
    reference.generation_config.eos_token_id = None  # every token may be drawn here
    starts = random_ids(1, 48, seed=6)[0]
    w = sample_windows(reference, starts, 24, seed=3, batch_size=20)
    assert w.shape == (48, 24) and w.dtype == torch.long and torch.equal(w[:, 0], starts)
    logp = torch.log_softmax(logits(reference, w).double(), -1)[:, :-1]
    drawn = logp.gather(-1, w[:, 1:, None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    gap = (drawn + entropy).flatten()
    se = float(gap.std() / gap.numel() ** 0.5)
    assert abs(float(gap.mean())) < 4 * se
    greedy = (logp.max(-1).values + entropy).mean()
    uniform = (logp.mean(-1) + entropy).mean()
    assert float(greedy) > 8 * se and float(uniform) < -4 * se  # the test tells both apart from sampling
    # seeded: the same seed gives the same windows, another seed others
    assert torch.equal(sample_windows(reference, starts, 24, seed=3, batch_size=20), w)
    assert not torch.equal(sample_windows(reference, starts, 24, seed=4, batch_size=20), w)


def test_sample_windows_never_draw_an_end_of_sequence():
    from pvq_cuda.pipeline.finetune import sample_windows

    reference = tiny_model(5).train()
    ends = list(range(0, reference.config.vocab_size, 2))  # half the vocabulary ends a sequence
    reference.generation_config.eos_token_id = ends
    w = sample_windows(reference, random_ids(1, 16, seed=7)[0], 20, seed=0)
    assert not torch.isin(w[:, 1:], torch.tensor(ends)).any()  # about half would be, unmasked
    reference.generation_config.eos_token_id = 1
    assert not (sample_windows(reference, random_ids(1, 16, seed=7)[0], 20, seed=0)[:, 1:] == 1).any()
    assert reference.training  # sampled in eval mode, handed back as it came


def test_sample_windows_refuse_bad_input():
    from pvq_cuda.pipeline.finetune import sample_windows

    reference = tiny_model(0)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([[1, 2]]), torch.tensor([], dtype=torch.long), [1, 2]):
        with pytest.raises(ValueError, match="starts must be a non-empty 1-D int64 tensor"):
            sample_windows(reference, bad, 8)
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="seqlen must be an int >= 2"):
            sample_windows(reference, torch.tensor([1, 2]), bad)
