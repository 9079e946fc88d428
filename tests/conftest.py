import pytest
import torch

import pvq_cuda

HAS_CUDA = torch.cuda.is_available() and pvq_cuda.cuda_built()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of pvq_cuda")


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
