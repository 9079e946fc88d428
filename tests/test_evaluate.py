"""Held-out perplexity and the standard error of a perplexity ratio."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from pvq_cuda.apps.evaluate import mean_standard_error, perplexity, ratio_standard_error  # noqa: E402
from tiny_llama import VOCAB, tiny_model  # noqa: E402


def test_perplexity_matches_a_direct_computation():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (5, 20), generator=torch.Generator().manual_seed(0))
    ev = perplexity(model, ids, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    assert ev["tokens"] == 5 * 19 and ev["windows"] == 5
    assert ev["window_nll"] == pytest.approx(nll.mean(1).tolist(), rel=1e-5)
    assert ev["perplexity"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-5)
    with pytest.raises(ValueError, match="windows must be token ids"):
        perplexity(model, ids[0])


def test_window_kl_matches_a_direct_computation():
    """KL(reference ‖ model) per window, against float64 log-softmaxes of both models' logits, with
    an odd window count (the last batch holds one window)."""
    reference, model = tiny_model(seed=0), tiny_model(seed=1)
    ids = torch.randint(0, VOCAB, (5, 20), generator=torch.Generator().manual_seed(2))
    ref = perplexity(reference, ids, batch_size=2, keep_logprobs=True)
    assert [t.shape for t in ref["logprobs"]] == [(2, 19, VOCAB), (2, 19, VOCAB), (1, 19, VOCAB)]
    ev = perplexity(model, ids, batch_size=2, reference_logprobs=ref["logprobs"])
    assert "logprobs" not in ev
    with torch.no_grad():
        p = torch.log_softmax(reference(input_ids=ids).logits[:, :-1].double(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
    expected = (p.exp() * (p - q)).sum(-1).mean(1)
    assert min(expected) > 1e-3  # two different models: a KL a float32 error cannot fake
    assert ev["window_kl"] == pytest.approx(expected.tolist(), rel=1e-4)
    same = perplexity(reference, ids, batch_size=2, reference_logprobs=ref["logprobs"])
    assert max(same["window_kl"]) < 1e-6
    with pytest.raises(ValueError, match="reference_logprobs must be 5 tensors"):
        perplexity(model, ids, batch_size=1, reference_logprobs=ref["logprobs"])
    with pytest.raises(ValueError, match="reference_logprobs must be 3 tensors"):
        perplexity(model, ids[:, :10], batch_size=2, reference_logprobs=ref["logprobs"])


def test_mean_standard_error():
    values = [1.0, 2.0, 4.0, 7.0]
    mean, se = mean_standard_error(values)
    assert mean == 3.5 and se == pytest.approx(float(torch.tensor(values, dtype=torch.float64).std()) / 2, rel=1e-12)
    assert mean_standard_error([5.0]) == (5.0, None)
    with pytest.raises(ValueError, match="no values"):
        mean_standard_error([])


def test_ratio_standard_error():
    gen = torch.Generator().manual_seed(1)
    ref = (3 + torch.rand(400, generator=gen, dtype=torch.float64)).tolist()
    shift = (0.1 + 0.05 * torch.randn(400, generator=gen, dtype=torch.float64)).tolist()
    nll = [a + b for a, b in zip(ref, shift)]
    se = ratio_standard_error(nll, ref)
    ratio = math.exp(sum(shift) / 400)
    expected = ratio * float(torch.tensor(shift).std()) / 20  # ratio * sd / sqrt(m)
    assert se == pytest.approx(expected, rel=1e-9) and 0.0025 < se < 0.0031
    assert ratio_standard_error(ref, ref) == 0.0  # a model against itself: no spread
    assert ratio_standard_error(nll[:1], ref[:1]) is None
    with pytest.raises(ValueError, match="3 windows against 2"):
        ratio_standard_error(nll[:3], ref[:2])
