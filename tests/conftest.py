import pytest
import torch

import pvq_cuda

HAS_CUDA = torch.cuda.is_available() and pvq_cuda.cuda_built()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build of pvq_cuda")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
