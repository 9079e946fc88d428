"""Held-out perplexity and the standard error of a perplexity ratio."""

import math

import pytest
import torch

pytest.importorskip("transformers")

from pvq_cuda.apps.evaluate import perplexity, ratio_standard_error  # noqa: E402
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
