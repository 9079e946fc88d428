import random
import zlib

import numpy as np
import pytest
import torch

import pvq_cuda

HAS_CUDA = torch.cuda.is_available() and pvq_cuda.cuda_built()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of pvq_cuda")


@pytest.fixture(autouse=True)
def _seed_global_rngs(request):
    """Seed torch's, numpy's and Python's global generators from the test's id before every test.

    A draw from a global generator (torch.randn without a generator) in a test's body or a
    function-scoped fixture gets inputs fixed by the test's name, not by how many draws the tests
    before it made: a failure reproduces when the test runs alone, and a statistical bound cannot
    pass in one ordering and fail in another. Wider-scoped fixtures are set up before this one, so
    they seed their own generators. Each test still gets its own random inputs.
    """
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs CUDA kernels (set by conftest on every requires_cuda test and "
                                       "every [cuda] case of the device fixture); `pytest -m cuda` is the GPU set")


def runs_cuda(item) -> bool:
    """A requires_cuda test, or a test's case with device="cuda"."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cuda":
        return True
    return any(m.kwargs.get("reason") == requires_cuda.kwargs["reason"] for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if runs_cuda(item):
            item.add_marker(pytest.mark.cuda)
