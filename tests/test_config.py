import pytest

import pvq_cuda
from pvq_cuda import PVQConfig


def test_presets_have_the_paper_rates():
    rates = {name: cfg.code_bpw for name, cfg in pvq_cuda.PRESETS.items()}
    assert rates == {"pvq-2.25": 2.25, "pvq-3.25": 3.25, "pvq-4.25": 4.25, "pvq16-3.25": 3.25, "pvq8-2.25": 2.25,
                     "pvq8-3.25": 3.25}
    assert PVQConfig() == PVQConfig.preset("pvq-3.25")
    assert PVQConfig.preset("pvq-3.25", seed=7).seed == 7


@pytest.mark.parametrize("kwargs,match", [
    ({"D": 3}, "D must be one of"),
    ({"K": 0}, "K must be"),
    ({"D": 32, "K": 30}, "63"),
    ({"scale_bits": 9}, "scale_bits"),
    ({"scale_bits": -1}, "scale_bits"),
    ({"D": 16, "K": 56, "scale_bits": 8}, "<= 64"),
    ({"rotate": 1}, "rotate"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
])
def test_invalid_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PVQConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'pvq-9'"):
        PVQConfig.preset("pvq-9")
