import pytest

import pvq_cuda
from reference_codec import V, closed_form


@pytest.mark.parametrize("D", range(0, 40))
def test_pyramid_size_matches_closed_form(D):
    for K in range(0, 140):
        assert pvq_cuda.pyramid_size(D, K) == closed_form(D, K) == V(D, K)


def test_pyramid_size_known_values():
    assert pvq_cuda.pyramid_size(8, 16) == 15_158_272  # 24 index bits: pvq-3.25
    assert pvq_cuda.pyramid_size(1, 5) == 2
    assert pvq_cuda.pyramid_size(2, 7) == 28
    assert pvq_cuda.pyramid_size(0, 0) == 1 and pvq_cuda.pyramid_size(0, 3) == 0
    # Exact beyond 64 bits: a Python int, not a float.
    big = pvq_cuda.pyramid_size(128, 187)
    assert isinstance(big, int) and big == closed_form(128, 187) and big.bit_length() == 384


def test_index_bits_of_presets():
    assert [pvq_cuda.index_bits(8, k) for k in (6, 16, 36)] == [15, 24, 32]
    assert pvq_cuda.index_bits(16, 30) == 50


def test_max_pulses_is_the_63_bit_limit():
    for D in pvq_cuda.SUPPORTED_D:
        k = pvq_cuda.max_pulses(D)
        assert pvq_cuda.index_bits(D, k) <= 63
        assert k == 127 or pvq_cuda.index_bits(D, k + 1) > 63


@pytest.mark.parametrize("D,K", [(-1, 3), (3, -2), (2.0, 3), (2, None), (True, 1)])
def test_pyramid_size_rejects_bad_arguments(D, K):
    with pytest.raises(ValueError, match="pyramid_size"):
        pvq_cuda.pyramid_size(D, K)
