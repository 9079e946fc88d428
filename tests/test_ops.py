"""The ops as torch ops: opcheck (schema, fake tensors, dispatch) and torch.compile."""

import pytest
import torch

import pvq_cuda


def _samples(device):
    x = torch.randn(6, 8, device=device)
    index = torch.randint(0, pvq_cuda.pyramid_size(16, 20), (3, 4), device=device)
    return [
        (torch.ops.pvq_cuda.search.default, (x, 16)),
        (torch.ops.pvq_cuda.search.default, (x.half().view(3, 2, 8), 6)),
        (torch.ops.pvq_cuda.search.default, (torch.randn(5, 32, device=device).bfloat16(), 21)),
        (torch.ops.pvq_cuda.encode.default, (pvq_cuda.search(x, 16), 16)),
        (torch.ops.pvq_cuda.decode.default, (index, 16, 20)),
        (torch.ops.pvq_cuda.decode.default, (index[0, 0], 16, 20)),
    ]


def test_opcheck(device):
    for op, args in _samples(device):
        torch.library.opcheck(op, args)


def test_compile_fullgraph(device):
    def roundtrip(x):
        y = pvq_cuda.search(x, 16)
        index = pvq_cuda.encode(y, 16)
        return pvq_cuda.decode(index, 8, 16).float() * 2, index

    x = torch.randn(32, 8, device=device)
    torch._dynamo.reset()
    got = torch.compile(roundtrip, fullgraph=True)(x)
    want = roundtrip(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_meta_tensors_give_shapes():
    x = torch.empty(4, 3, 8, device="meta")
    assert pvq_cuda.search(x, 5).shape == (4, 3, 8)
    assert pvq_cuda.encode(torch.empty(4, 16, dtype=torch.int8, device="meta"), 5).shape == (4,)
    assert pvq_cuda.decode(torch.empty(7, dtype=torch.int64, device="meta"), 32, 5).shape == (7, 32)


def test_exported_names():
    for name in ("pyramid_size", "search", "encode", "decode", "cuda_built"):
        assert callable(getattr(pvq_cuda, name))
    assert isinstance(pvq_cuda.cuda_built(), bool)
