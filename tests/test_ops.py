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


def _elf_needed(path):
    """The DT_NEEDED names of a 64-bit little-endian ELF shared object (its dynamic section)."""
    import pathlib
    import struct

    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab = sections[dynamic[6]]  # sh_link: the dynamic string table
    names = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 1:  # DT_NEEDED
            start = strtab[4] + val
            names.append(data[start:data.index(b"\0", start)].decode())
    return names


def test_extension_links_the_shared_libstdcxx():
    """_C uses the libstdc++ that torch loads. A toolchain that links it statically (the H200
    image's did) gave _C a private copy that crashed writing numbers into error messages; the
    link line in CMakeLists.txt names the shared one first, and this checks that it took."""
    from pvq_cuda.ops import _C

    needed = _elf_needed(_C.__file__)
    assert any(name.startswith("libstdc++.so") for name in needed), f"{_C.__file__} needs only {needed}"
    with pytest.raises(ValueError, match=r"element 1 \(flattened\) is -5$"):
        pvq_cuda.decode(torch.tensor([3, -5]), 8, 16)
