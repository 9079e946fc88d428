"""pvq_cuda.save / load / read_metadata: round trips, atomic writes, and corrupted files.

Every corrupted, truncated or foreign file must raise FormatError naming the file and the reason.
safetensors validates the framing (header length, JSON, dtypes, shapes, data offsets) and
pvq_cuda's container turns its findings into plain reasons; pvq_cuda's own checks (format,
version, objects, header checksum, tensor checksums) catch everything else, never by luck.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import struct
import tempfile
import types
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pvq_cuda
from pvq_cuda import FormatError
from pvq_cuda.format.container import RESERVED_METADATA_KEYS, _header_checksum
from conftest import requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64,
          torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool]


class Affine:
    """Test-only serializable: int8 codes [rows, cols] and a float32 scale per row."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, label: str = ""):
        self.codes, self.scale, self.label = codes, scale, label

    def to_state(self):
        rows, cols = self.codes.shape
        return {"codes": self.codes, "scale": self.scale}, {"rows": rows, "cols": cols, "label": self.label}

    @classmethod
    def from_state(cls, tensors, info):
        if set(tensors) != {"codes", "scale"}:
            raise ValueError(f"Affine needs parts codes and scale, got {sorted(tensors)}")
        if set(info) != {"rows", "cols", "label"}:
            raise ValueError(f"Affine info needs rows, cols, label, got {sorted(info)}")
        rows, cols = info["rows"], info["cols"]
        codes, scale = tensors["codes"], tensors["scale"]
        if codes.dtype != torch.int8 or tuple(codes.shape) != (rows, cols):
            raise ValueError(f"Affine codes must be int8 of shape ({rows}, {cols}), got {codes.dtype} {tuple(codes.shape)}")
        if scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
            raise ValueError(f"Affine scale must be float32 of shape ({rows},), got {scale.dtype} {tuple(scale.shape)}")
        return cls(codes, scale, info["label"])

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]


class Fragile:
    """Test-only serializable whose from_state fails with something other than ValueError."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def to_state(self):
        return {"x": self.x}, {}

    @classmethod
    def from_state(cls, tensors, info):
        raise RuntimeError("fragile parts")


class Liar:
    """Test-only serializable whose from_state returns the wrong type."""

    def to_state(self):
        return {}, {}

    @classmethod
    def from_state(cls, tensors, info):
        return "not a Liar"


pvq_cuda.register_serializable("test_io.Affine", Affine)
pvq_cuda.register_serializable("test_io.Fragile", Fragile)
pvq_cuda.register_serializable("test_io.Liar", Liar)


def affine(rows: int, cols: int, seed: int, label: str = "") -> Affine:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8)
    return Affine(codes, torch.rand(rows, generator=g) + 0.5, label)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so NaN payloads and -0.0 count too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def same_affine(a: Affine, b: Affine) -> bool:
    return type(b) is Affine and same(a.codes, b.codes) and same(a.scale, b.scale) and a.label == b.label


def random_tensor(dtype, shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=g, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)], ids=str)
def test_round_trip_dtypes_and_shapes(tmp_path, dtype, shape):
    t = random_tensor(dtype, shape)
    pvq_cuda.save(tmp_path / "t.pvq", {"t": t})
    out = pvq_cuda.load(tmp_path / "t.pvq")
    assert list(out) == ["t"] and same(out["t"], t)
    assert out["t"].is_contiguous()


def test_round_trip_special_float_values(tmp_path):
    bits = torch.tensor([0x7FC00001, 0xFF800000, 0x7F800000, 0x80000000, 0x00000001], dtype=torch.int64)
    t = bits.to(torch.int32).view(torch.float32)  # a NaN with payload, -inf, inf, -0.0, a denormal
    pvq_cuda.save(tmp_path / "f.pvq", {"f": t, "h": t.half(), "b": t.bfloat16()})
    out = pvq_cuda.load(tmp_path / "f.pvq")
    assert same(out["f"], t) and same(out["h"], t.half()) and same(out["b"], t.bfloat16())


def test_round_trip_non_contiguous_and_shared(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    views = {
        "transposed": base.transpose(0, 2),
        "strided": base[:, ::2, 1::2],
        "expanded": torch.arange(4, dtype=torch.int16).expand(3, 4),
        "offset": base.reshape(-1)[7:19],
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "base": base,
        "tied": base,  # the same tensor twice, as with tied embeddings
        "empty_view": base.reshape(-1)[5:5],
        "grad": torch.randn(3, requires_grad=True),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }
    before = {k: v.detach().clone() for k, v in views.items()}
    pvq_cuda.save(tmp_path / "v.pvq", views)
    out = pvq_cuda.load(tmp_path / "v.pvq")
    assert sorted(out) == sorted(views)
    for k, v in views.items():
        assert same(out[k], v), k
        assert same(v, before[k]), f"save modified its input {k}"
        assert type(out[k]) is torch.Tensor and not out[k].requires_grad


def test_round_trip_objects_metadata_and_order(tmp_path):
    objs = {f"layers.{i}.w": affine(3 + i, 4, seed=i, label=f"layer {i}") for i in range(4)}
    plain = {"bias": torch.randn(5), "layers.0.w.extra": torch.ones(2)}  # not a part of layers.0.w
    meta = {"author": "pvq", "note": 'quotes " and \\ and {"json": 1}', "unicode": "Gruß, 量子化", "empty": ""}
    pvq_cuda.save(str(tmp_path / "o.pvq"), {**plain, **objs}, metadata=meta)
    out = pvq_cuda.load(str(tmp_path / "o.pvq"))
    assert list(out) == sorted([*plain, *objs])
    for k, v in plain.items():
        assert same(out[k], v)
    for k, v in objs.items():
        assert same_affine(v, out[k])
        assert torch.equal(out[k].dequantize(), v.dequantize())
    assert pvq_cuda.read_metadata(tmp_path / "o.pvq") == meta
    # The parts are ordinary safetensors tensors under "name.part".
    raw = safetensors.torch.load_file(tmp_path / "o.pvq")
    assert same(raw["layers.2.w.codes"], objs["layers.2.w"].codes)
    assert set(raw) == {*plain, *(f"{k}.{p}" for k in objs for p in ("codes", "scale"))}


def test_round_trip_empty_and_no_metadata(tmp_path):
    pvq_cuda.save(tmp_path / "e.pvq", {})
    assert pvq_cuda.load(tmp_path / "e.pvq") == {}
    assert pvq_cuda.read_metadata(tmp_path / "e.pvq") == {}
    pvq_cuda.save(tmp_path / "z.pvq", {"liar": Liar(), "z": torch.zeros(0, 4)})  # an object without parts
    with pytest.raises(TypeError, match="from_state returned a str"):
        pvq_cuda.load(tmp_path / "z.pvq")


def test_file_layout(tmp_path):
    """The header carries what the module docstring promises, and plain safetensors can read it."""
    pvq_cuda.save(tmp_path / "l.pvq", {"w": affine(2, 3, 0), "b": torch.ones(2, dtype=torch.int32)}, {"k": "v"})
    data = (tmp_path / "l.pvq").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header["__metadata__"]
    assert meta["format"] == "pt" and meta["pvq_cuda_format"] == str(pvq_cuda.FORMAT_VERSION) == "2"
    assert meta["k"] == "v"
    assert json.loads(meta["objects"]) == {"w": {"type": "test_io.Affine", "parts": ["codes", "scale"],
                                                 "info": {"rows": 2, "cols": 3, "label": ""}}}
    sums = json.loads(meta["checksums"])
    assert set(sums) == {"b", "w.codes", "w.scale"}
    for name, e in header.items():
        if name != "__metadata__":
            begin, end = e["data_offsets"]
            assert sums[name] == f"{zlib.crc32(data[8 + n + begin:8 + n + end]):08x}"
    assert set(RESERVED_METADATA_KEYS) - {"format_version"} <= set(meta)  # format_version: version 1's key
    with safetensors.safe_open(tmp_path / "l.pvq", framework="pt") as f:
        assert f.metadata() == meta


def test_load_device(tmp_path):
    pvq_cuda.save(tmp_path / "d.pvq", {"t": torch.arange(4), "w": affine(2, 2, 1)})
    for device in ["cpu", torch.device("cpu")]:
        out = pvq_cuda.load(tmp_path / "d.pvq", device=device)
        assert out["t"].device.type == "cpu" and out["w"].codes.device.type == "cpu"
    with pytest.raises(ValueError, match="device must name a torch device"):
        pvq_cuda.load(tmp_path / "d.pvq", device="nonsense")


@requires_cuda
def test_cuda_save_and_load(tmp_path):
    t = torch.randn(4, 6, device="cuda")
    w = affine(3, 2, 5)
    w_cuda = Affine(w.codes.cuda(), w.scale.cuda(), "gpu")
    pvq_cuda.save(tmp_path / "c.pvq", {"t": t.t(), "w": w_cuda})
    out = pvq_cuda.load(tmp_path / "c.pvq", device="cuda")
    assert out["t"].is_cuda and out["w"].codes.is_cuda and out["w"].scale.is_cuda
    assert same(out["t"], t.t()) and same(out["w"].codes, w.codes)
    out_cpu = pvq_cuda.load(tmp_path / "c.pvq")
    assert not out_cpu["t"].is_cuda and same(out_cpu["t"], t.t())


@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_round_trip_property(data):
    tensors = {}
    for i in range(data.draw(st.integers(0, 5), label="count")):
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        shape = data.draw(st.lists(st.integers(0, 5), max_size=4), label="shape")
        numel = math.prod(shape)
        raw = data.draw(st.binary(min_size=numel * dtype.itemsize, max_size=numel * dtype.itemsize), label="bytes")
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        elif dtype == torch.bool:
            t = (torch.frombuffer(bytearray(raw), dtype=torch.uint8) & 1).bool().reshape(shape)
        else:
            t = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)  # any bits: NaNs, denormals
        if t.dim() >= 2 and data.draw(st.booleans(), label="transpose"):
            t = t.transpose(0, -1)
        name = data.draw(st.text(min_size=1, max_size=8).filter(
            lambda s: s != "__metadata__" and s not in tensors and not s.startswith("obj")), label="name")
        tensors[name] = t
    if data.draw(st.booleans(), label="with object"):
        tensors["obj"] = affine(data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4)), seed=3,
                                label=data.draw(st.text(max_size=6)))
    metadata = data.draw(st.dictionaries(st.text(max_size=6).filter(lambda k: k not in RESERVED_METADATA_KEYS),
                                         st.text(max_size=12), max_size=3), label="metadata")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.pvq"
        pvq_cuda.save(path, tensors, metadata)
        out = pvq_cuda.load(path)
        assert pvq_cuda.read_metadata(path) == metadata
        assert os.listdir(d) == ["p.pvq"]
    assert sorted(out) == sorted(tensors)
    for k, v in tensors.items():
        assert same_affine(v, out[k]) if isinstance(v, Affine) else same(out[k], v), k


# ---------------------------------------------------------------------------------------------
# save: bad arguments


def test_save_rejects_bad_names_and_values(tmp_path):
    p = tmp_path / "x.pvq"
    t = torch.ones(2)
    cases = [
        ({1: t}, TypeError, "names in tensors must be str, got int"),
        ({"": t}, ValueError, "names in tensors must be non-empty"),
        ({"__metadata__": t}, ValueError, "must not be '__metadata__'"),
        ({"bad\ud800": t}, ValueError, "encodable as UTF-8"),
        ({"x": [1.0, 2.0]}, TypeError, r"tensors\['x'\] must be a torch.Tensor or an instance of a class registered"),
        ({"x": object()}, TypeError, "register_serializable"),
        ({"x": torch.ones(2, dtype=torch.complex64)}, TypeError, "tensor 'x' has dtype complex64"),
        ({"x": torch.ones(2, device="meta")}, ValueError, "meta device"),
        ({"x": torch.eye(3).to_sparse()}, ValueError, "dense"),
        ({"a": affine(2, 2, 0), "a.codes": t}, ValueError, "would both be stored as 'a.codes'"),
        ({"a.codes": t, "a": affine(2, 2, 0)}, ValueError, "would both be stored as 'a.codes'"),
        ({"a": Fragile(t), "a.x": t}, ValueError, "'a.x'"),
        ({"a": Affine(torch.ones(1, 1, dtype=torch.int8), {"no": "tensor"})}, TypeError,
         "part 'scale' of object 'a' must be a torch.Tensor"),
    ]
    for tensors, exc, match in cases:
        with pytest.raises(exc, match=match):
            pvq_cuda.save(p, tensors)
        assert not p.exists() and os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="tensors must be a mapping"):
        pvq_cuda.save(p, [("x", t)])
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        pvq_cuda.save(b"x.pvq", {"x": t})
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        pvq_cuda.save(3, {"x": t})


class _Parts:
    """Test-only serializable with free-form parts, to provoke collisions between objects."""

    def __init__(self, parts, info=None):
        self.parts, self.info = parts, info if info is not None else {}

    def to_state(self):
        return self.parts, self.info

    @classmethod
    def from_state(cls, tensors, info):
        return cls(tensors, info)


pvq_cuda.register_serializable("test_io._Parts", _Parts)


def test_save_rejects_colliding_objects_and_bad_state(tmp_path):
    p = tmp_path / "x.pvq"
    t = torch.ones(2)
    cases = [
        ({"a": _Parts({"b.c": t}), "a.b": _Parts({"c": t})}, ValueError, "would both be stored as 'a.b.c'"),
        ({"a": _Parts({"": t})}, ValueError, "part names of object 'a' must be non-empty"),
        ({"a": _Parts({3: t})}, TypeError, "part names of object 'a' must be str"),
        ({"a": _Parts({"x": t}, {"s": {1, 2}})}, ValueError, r"info of object 'a'\['s'\] is a set"),
        ({"a": _Parts({"x": t}, {"f": float("nan")})}, ValueError, "nan, which JSON cannot store"),
        ({"a": _Parts({"x": t}, {"d": {1: 2}})}, ValueError, "non-str key 1"),
        ({"a": _Parts({"x": t}, [1, 2])}, TypeError, r"to_state\(\) must return \(dict of tensors, info dict\)"),
    ]
    for tensors, exc, match in cases:
        with pytest.raises(exc, match=match):
            pvq_cuda.save(p, tensors)
        assert os.listdir(tmp_path) == []
    # Dotted names that do not collide are fine, and load tells them apart.
    info = types.MappingProxyType({"n": [1, (2, 3)], "s": "x", "m": OrderedDict(k=1.5)})
    ok = {"a": _Parts({"b": t, "c.d": t * 2}, info), "a.c": t * 3, "a.b.c": t * 4}
    pvq_cuda.save(p, ok)
    out = pvq_cuda.load(p)
    assert sorted(out) == ["a", "a.b.c", "a.c"]
    assert same(out["a"].parts["c.d"], t * 2) and same(out["a.c"], t * 3) and same(out["a.b.c"], t * 4)
    assert out["a"].info == {"n": [1, [2, 3]], "s": "x", "m": {"k": 1.5}}  # tuples come back as lists (JSON)


def test_save_rejects_bad_metadata(tmp_path):
    p = tmp_path / "x.pvq"
    cases = [({1: "a"}, "metadata must map str to str"), ({"a": 1}, "metadata must map str to str"),
             ({"a": None}, "metadata must map str to str"), ({"a": b"x"}, "metadata must map str to str"),
             (["a"], "metadata must be a mapping"), ({"k": "\udc80"}, "not encodable as UTF-8")]
    cases += [({key: "x"}, f"metadata key '{key}' is reserved") for key in sorted(RESERVED_METADATA_KEYS)]
    for metadata, match in cases:
        with pytest.raises(ValueError, match=match):
            pvq_cuda.save(p, {"t": torch.ones(1)}, metadata)
        assert os.listdir(tmp_path) == []


def test_register_serializable_checks():
    class NoMethods:
        pass

    class Other:
        to_state = Affine.to_state
        from_state = Affine.from_state

    with pytest.raises(ValueError, match="tag must be a non-empty str"):
        pvq_cuda.register_serializable("", Affine)
    with pytest.raises(ValueError, match="tag must be a non-empty str"):
        pvq_cuda.register_serializable(None, Affine)
    with pytest.raises(TypeError, match="cls must be a class"):
        pvq_cuda.register_serializable("x", Affine(torch.ones(1, 1, dtype=torch.int8), torch.ones(1)))
    with pytest.raises(TypeError, match=r"has no method to_state\(\)"):
        pvq_cuda.register_serializable("x", NoMethods)
    with pytest.raises(ValueError, match="tag 'test_io.Affine' is already registered for .*Affine"):
        pvq_cuda.register_serializable("test_io.Affine", Other)
    with pytest.raises(ValueError, match="class Affine is already registered as 'test_io.Affine'"):
        pvq_cuda.register_serializable("test_io.Affine2", Affine)
    assert pvq_cuda.register_serializable("test_io.Affine", Affine) is Affine  # idempotent


def test_format_error_type():
    e = FormatError("some/file.pvq", "checksum mismatch for tensor 'x'")
    assert isinstance(e, ValueError)
    assert str(e) == "cannot read pvq_cuda file 'some/file.pvq': checksum mismatch for tensor 'x'"
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.path, e2.reason, str(e2)) == (e.path, e.reason, str(e))


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _write_old(path: Path) -> bytes:
    pvq_cuda.save(path, {"old": torch.arange(10)}, {"version": "old"})
    return path.read_bytes()


def _assert_old_intact(path: Path, old: bytes):
    assert path.read_bytes() == old
    assert os.listdir(path.parent) == [path.name], "a temporary file was left behind"
    assert same(pvq_cuda.load(path)["old"], torch.arange(10))


@pytest.mark.parametrize("where", ["save_file", "fsync", "replace", "interrupt"])
def test_failed_save_leaves_existing_file_untouched(tmp_path, monkeypatch, where):
    path = tmp_path / "model.pvq"
    old = _write_old(path)
    seen = []

    def failing_save_file(tensors, filename, metadata=None):
        seen.append(filename)
        Path(filename).write_bytes(b"half a file")  # a partial write, then the disk fills up
        if where == "interrupt":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    def failing(*args, **kwargs):
        raise OSError(5, f"simulated {where} failure")

    if where in ("save_file", "interrupt"):
        monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    else:
        monkeypatch.setattr(os, where, failing)
    with pytest.raises(KeyboardInterrupt if where == "interrupt" else OSError):
        pvq_cuda.save(path, {"new": torch.ones(3)}, {"version": "new"})
    monkeypatch.undo()
    _assert_old_intact(path, old)
    if seen:  # the write went to a temporary file beside the target, never to the target
        assert Path(seen[0]).parent == tmp_path and Path(seen[0]).name != path.name


def test_failed_validation_writes_nothing(tmp_path):
    path = tmp_path / "model.pvq"
    old = _write_old(path)
    with pytest.raises(ValueError):
        pvq_cuda.save(path, {"new": torch.ones(3)}, {"format": "mine"})
    with pytest.raises(TypeError):
        pvq_cuda.save(path, {"new": "not a tensor"})
    _assert_old_intact(path, old)


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "model.pvq"
    _write_old(path)
    pvq_cuda.save(path, {"new": torch.ones(3)}, {"version": "new"})
    assert list(pvq_cuda.load(path)) == ["new"]
    assert pvq_cuda.read_metadata(path) == {"version": "new"}
    path.write_bytes(b"some other file")  # replacing a file that is not ours is fine too
    pvq_cuda.save(path, {"x": torch.zeros(1)})
    assert list(pvq_cuda.load(path)) == ["x"]
    assert os.listdir(tmp_path) == ["model.pvq"]


def test_save_errors_from_the_filesystem(tmp_path):
    with pytest.raises(FileNotFoundError):
        pvq_cuda.save(tmp_path / "no" / "such" / "dir.pvq", {"x": torch.ones(1)})
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        pvq_cuda.save(tmp_path / "d", {"x": torch.ones(1)})  # a directory is in the way
    assert os.listdir(tmp_path / "d") == [] and os.listdir(tmp_path) == ["d"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_saved_file_permissions_follow_umask(tmp_path):
    pvq_cuda.save(tmp_path / "a.pvq", {"x": torch.ones(1)})
    (tmp_path / "b").write_bytes(b"")
    assert stat.S_IMODE((tmp_path / "a.pvq").stat().st_mode) == stat.S_IMODE((tmp_path / "b").stat().st_mode)


def test_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pvq_cuda.save("rel.pvq", {"x": torch.ones(1)})
    assert list(pvq_cuda.load("rel.pvq")) == ["x"] and os.listdir(".") == ["rel.pvq"]


# ---------------------------------------------------------------------------------------------
# Corrupted files
#
# The reference file holds plain tensors of several dtypes, two objects and metadata; its header
# ends in a few bytes of space padding, so that whitespace edits can be checked both ways.

ST_JSON = r"the header is not valid safetensors JSON \(safetensors: invalid JSON in header: .+\)"
ST_UTF8 = r"the header is not valid UTF-8 \(safetensors: "
ST_SMALL = r"too short for a safetensors header \(truncated, or not a safetensors file\)"
ST_LARGE = r"the header length field exceeds safetensors' limit \(not a safetensors file\?\)"
ST_PAST = r"truncated: the header length field points past the end of the file"
ST_FILL = r"truncated or corrupt: the tensor data does not exactly fill the file after the header"
ST_OFFSETS = r"corrupt: tensor data_offsets overlap, leave a gap or run past the data \(safetensors: invalid offset"
ST_SHAPE = r"corrupt: a tensor's dtype and shape do not match its data_offsets"

HEADER_REASONS = re.compile(
    "|".join([
        ST_JSON, ST_UTF8, ST_SMALL, ST_LARGE, ST_PAST, ST_FILL, ST_OFFSETS, ST_SHAPE,
        r"not a pvq_cuda file", r"metadata 'format' is", r"invalid (pvq_cuda_format|format_version)",
        r"is newer than this pvq_cuda supports", r"metadata has no '\w+'", r"header checksum mismatch",
    ])
)


class Ref:
    """A valid file's bytes, split into its parts, and what loading it must give."""

    def __init__(self, data: bytes, expected: dict):
        self.data = data
        (self.n,) = struct.unpack("<Q", data[:8])
        self.raw_header = data[8:8 + self.n]
        self.header = json.loads(self.raw_header)
        self.buffer = data[8 + self.n:]
        self.padding = len(self.raw_header) - len(self.raw_header.rstrip(b" "))
        self.expected = expected

    def tensor_at(self, pos: int) -> str:
        """The tensor whose region holds byte ``pos`` of the data buffer."""
        for name, e in self.header.items():
            if name != "__metadata__" and e["data_offsets"][0] <= pos < e["data_offsets"][1]:
                return name
        raise AssertionError(pos)


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Ref:
    d = tmp_path_factory.mktemp("ref")
    tensors = {
        "bias": torch.linspace(-1, 1, 5),
        "step": torch.tensor(12345, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.randn(2, 3, generator=torch.Generator().manual_seed(3)).half(),
        "empty": torch.zeros(0, 3, dtype=torch.int16),
        "w": affine(3, 4, seed=1, label="w"),
        "v": affine(2, 2, seed=2, label="v"),
    }
    for i in range(8):  # pick the metadata length that leaves at least 3 bytes of padding
        meta = {"author": "test", "pad": "x" * i}
        pvq_cuda.save(d / "ref.pvq", tensors, meta)
        r = Ref((d / "ref.pvq").read_bytes(), tensors)
        if r.padding >= 3:
            return r
    raise AssertionError("no padding")


class Scratch:
    """One file rewritten in place for each corrupted variant (one open instead of thousands)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, data) -> Path:
        os.ftruncate(self.fd, len(data))
        os.pwrite(self.fd, data, 0)
        return self.path

    def close(self):
        os.close(self.fd)


@pytest.fixture
def scratch(tmp_path):
    f = Scratch(tmp_path / "corrupt.pvq")
    yield f
    f.close()


def assert_loads_as_reference(path: Path, ref: Ref):
    out = pvq_cuda.load(path)
    assert sorted(out) == sorted(ref.expected)
    for k, v in ref.expected.items():
        assert same_affine(v, out[k]) if isinstance(v, Affine) else same(out[k], v), k


def assert_format_error(path: Path, reason, *, what="") -> FormatError:
    with pytest.raises(FormatError) as info:
        pvq_cuda.load(path)
    e = info.value
    msg = str(e)
    assert os.fspath(path) in msg, msg
    assert re.search(reason, msg), f"{what}: {msg!r} does not match {reason!r}"
    assert "SafetensorError" not in msg, f"{what}: safetensors' error was passed on untranslated: {msg}"
    return e


def rebuild(ref: Ref, edit=None, *, reseal=True, buffer=None, sub=None) -> bytes:
    """The reference file with its header edited (and the header checksum recomputed).

    ``edit(header)`` edits the parsed header in place; ``sub`` maps a metadata key holding JSON
    ("objects", "checksums") to a function that edits that JSON in place.
    """
    header = json.loads(ref.raw_header)
    meta = header.get("__metadata__")
    for key, fn in (sub or {}).items():
        value = json.loads(meta[key])
        fn(value)
        meta[key] = json.dumps(value)
    if edit:
        edit(header)
    meta = header.get("__metadata__")
    if reseal and isinstance(meta, dict) and "header_checksum" in meta:
        try:
            meta["header_checksum"] = _header_checksum(meta, {k: v for k, v in header.items() if k != "__metadata__"})
        except (AttributeError, TypeError):
            pass  # a malformed entry: the structural checks must catch it before the checksum
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + (ref.buffer if buffer is None else buffer)


def test_rebuild_without_edits_loads(tmp_path, ref):
    p = tmp_path / "same.pvq"
    p.write_bytes(rebuild(ref))
    assert_loads_as_reference(p, ref)
    p.write_bytes(ref.data)
    assert_loads_as_reference(p, ref)
    assert pvq_cuda.read_metadata(p) == {"author": "test", "pad": json.loads(ref.raw_header)["__metadata__"]["pad"]}


def test_truncated_everywhere(scratch, ref):
    """Cut at every byte of the length field and header, and at every byte of the data."""
    n, count = ref.n, 0
    for k in range(len(ref.data)):
        p = scratch.write(ref.data[:k])
        if k < 8:
            reason = ST_SMALL
        elif k < 8 + n:
            reason = ST_PAST
        else:
            reason = ST_FILL
        assert_format_error(p, reason, what=f"cut at {k}")
        with pytest.raises(FormatError, match=reason):
            pvq_cuda.read_metadata(p)
        count += 1
    assert count == len(ref.data) and len(ref.buffer) >= 64


def _json_or_none(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return None


def test_header_bit_flips(scratch, ref):
    """Flip each of the 8 bits of every byte of the length field and the header.

    A flip is harmless only if the header parses to the same JSON with the same length; no
    single-bit flip does that (the padding is spaces, and a space with one bit flipped is not
    whitespace), so every one of them must raise.
    """
    count = 0
    for pos in range(8 + ref.n):
        for bit in range(8):
            data = bytearray(ref.data)
            data[pos] ^= 1 << bit
            p = scratch.write(data)
            equivalent = pos >= 8 and _json_or_none(bytes(data[8:8 + ref.n])) == ref.header
            assert not equivalent, f"byte {pos} bit {bit}"
            e = assert_format_error(p, HEADER_REASONS, what=f"byte {pos} bit {bit}")
            if pos < 8:
                assert re.search("header length|truncated|not valid|data_offsets", e.reason), e.reason
            count += 1
    assert count == 8 * (8 + ref.n)


def test_header_whitespace_edits(scratch, ref):
    """Replace every header byte by each JSON whitespace character: harmless in the padding (the
    file must then load exactly as before), an error everywhere else."""
    harmless, errors = [], 0
    for pos in range(8, 8 + ref.n):
        for ch in b" \t\n\r":
            if ref.data[pos] == ch:
                continue
            data = bytearray(ref.data)
            data[pos] = ch
            p = scratch.write(data)
            if _json_or_none(bytes(data[8:8 + ref.n])) == ref.header:
                assert_loads_as_reference(p, ref)
                assert pvq_cuda.read_metadata(p)["author"] == "test"
                harmless.append(pos)
            else:
                assert_format_error(p, HEADER_REASONS, what=f"byte {pos} -> {ch!r}")
                errors += 1
    padding = range(8 + ref.n - ref.padding, 8 + ref.n)
    assert sorted(harmless) == sorted([pos for pos in padding for _ in range(3)])
    assert errors > 1000


def test_data_flips_caught_by_checksums(scratch, ref):
    count = 0
    for pos in range(len(ref.buffer)):
        name = ref.tensor_at(pos)
        for mask in (0x01, 0x80, 0xFF):
            data = bytearray(ref.data)
            data[8 + ref.n + pos] ^= mask
            p = scratch.write(data)
            assert_format_error(p, rf"checksum mismatch for tensor '{re.escape(name)}' \(its data is corrupt\)",
                                what=f"data byte {pos}")
            assert pvq_cuda.read_metadata(p)["author"] == "test"  # the header alone is fine
            count += 1
    assert count == 3 * len(ref.buffer) > 150


def _set(path, value):
    """An edit that sets header[path[0]][path[1]]... = value."""
    def edit(h):
        for key in path[:-1]:
            h = h[key]
        h[path[-1]] = value
    return edit


def _delete(path):
    def edit(h):
        for key in path[:-1]:
            h = h[key]
        del h[path[-1]]
    return edit


def _offsets(name, f):
    def edit(h):
        h[name]["data_offsets"] = f(*h[name]["data_offsets"])
    return edit


def _swap_regions(h):
    h["w.codes"]["data_offsets"], h["bias"]["data_offsets"] = h["bias"]["data_offsets"], h["w.codes"]["data_offsets"]


def _overlap(h):
    # "step" (8 bytes) moved onto the first 8 of the 20 bytes of "bias"
    b, e = h["bias"]["data_offsets"]
    h["step"]["data_offsets"] = [b, b + 8]


def _rename(h):
    h["bias2"] = h.pop("bias")


M = "__metadata__"

# (id, edit of the header, expected reason); the header checksum is recomputed after each edit
HEADER_CASES = [
    # format and version
    ("no metadata", _delete([M]), r"not a pvq_cuda file \(no __metadata__ in the header\)"),
    ("metadata not an object", _set([M], ["format"]), ST_JSON),
    ("metadata value not str", _set([M, "author"], 3), ST_JSON),
    ("no format", _delete([M, "format"]), r"metadata 'format' is None, expected 'pt'"),
    ("wrong format", _set([M, "format"], "gguf"), r"metadata 'format' is 'gguf', expected 'pt'"),
    ("format case", _set([M, "format"], "PT"), r"metadata 'format' is 'PT', expected 'pt'"),
    ("version 3", _set([M, "pvq_cuda_format"], "3"), r"pvq_cuda_format 3 is newer than this pvq_cuda supports \(2\)"),
    ("version 10", _set([M, "pvq_cuda_format"], "10"), r"pvq_cuda_format 10 is newer than this pvq_cuda supports"),
    ("version huge", _set([M, "pvq_cuda_format"], "999999999"), r"pvq_cuda_format 999999999 is newer"),
    ("no version", _delete([M, "pvq_cuda_format"]),
     r"not a pvq_cuda file \(its metadata has no 'pvq_cuda_format'; 'format' is 'pt'\)"),
    # version 1 files: format "pvq_cuda", versioned by format_version
    ("v1 version 2", lambda h: h[M].update({"format": "pvq_cuda", "format_version": "2"}) or h[M].pop("pvq_cuda_format"),
     r"format_version 2 is newer than this pvq_cuda supports \(1\)"),
    ("v1 no version", lambda h: h[M].update({"format": "pvq_cuda"}) or h[M].pop("pvq_cuda_format"),
     r"metadata has no 'format_version'"),
    *[(f"version {v!r}", _set([M, "pvq_cuda_format"], v), r"invalid pvq_cuda_format")
      for v in ["0", "-1", "1.0", " 1", "1 ", "01", "abc", "", "１", "99999999999999999999", "0x1"]],
    # tensor entries: dtype
    *[(f"dtype {v!r}", _set(["bias", "dtype"], v), ST_JSON) for v in ["F8", "f32", "", "FLOAT", "I4", 32, None, ["F32"]]],
    # dtypes safetensors knows, whose size does not fit the entry's 20 bytes
    *[(f"dtype {v!r}", _set(["bias", "dtype"], v), ST_SHAPE) for v in ["F8_E4M3", "C64", "U16", "U64"]],
    # shape
    *[(f"shape {v!r}", _set(["w.codes", "shape"], v), ST_JSON)
      for v in [[-3, 4], [3.0, 4], [3, "4"], "34", None, [True, 4], [[3], 4], 12, [3, -0.5], {"0": 3}]],
    ("shape too big", _set(["w.codes", "shape"], [3, 5]), ST_SHAPE),
    ("shape too small", _set(["w.codes", "shape"], [3, 3]), ST_SHAPE),
    # same size, so a consistent file: only the object's own validation can object
    ("shape rank", _set(["w.codes", "shape"], [12]),
     r"object 'w' of type 'test_io.Affine' could not be rebuilt: "
     r"ValueError: Affine codes must be int8 of shape \(3, 4\), got torch.int8 \(12,\)"),
    ("shape enormous", _set(["w.codes", "shape"], [2**62, 2**62, 2**62]), r"corrupt: a tensor's shape is too large"),
    ("shape empty", _set(["bias", "shape"], []), ST_SHAPE),
    ("dtype wider", _set(["bias", "dtype"], "F64"), ST_SHAPE),
    # data_offsets
    *[(f"offsets {v!r}", _set(["bias", "data_offsets"], v), ST_JSON)
      for v in [[0], [0, 20, 40], [-20, 0], [20.0, 40.0], ["0", "20"], None, 20, [True, 20]]],
    ("offsets reversed", _set(["bias", "data_offsets"], [40, 20]), ST_OFFSETS),
    ("offsets past end", _offsets("bias", lambda b, e: [b + 10**6, e + 10**6]), ST_OFFSETS),
    ("offsets far past end", _offsets("bias", lambda b, e: [b, 2**64 + 5]), ST_JSON),
    ("offsets short", _offsets("bias", lambda b, e: [b, e - 4]), ST_SHAPE),
    ("offsets long", _offsets("bias", lambda b, e: [b, e + 1]), ST_SHAPE),
    ("offsets swapped", _swap_regions, ST_SHAPE),
    ("offsets overlap", _overlap, ST_OFFSETS),
    ("offsets shifted", _offsets("mask", lambda b, e: [b + 1, e + 1]), ST_OFFSETS),
    ("offsets of empty", _offsets("empty", lambda b, e: [b + 1, e + 1]), ST_OFFSETS),
    # entries
    ("entry not object", _set(["bias"], [1, 2]), ST_JSON),
    ("entry no dtype", _delete(["bias", "dtype"]), ST_JSON),
    ("entry no shape", _delete(["bias", "shape"]), ST_JSON),
    ("entry no offsets", _delete(["bias", "data_offsets"]), ST_JSON),
    ("entry removed", _delete(["bias"]), ST_OFFSETS),
    ("entry renamed", _rename, r"no checksum for tensor 'bias2'"),
    ("entry is a number", _set(["x"], 1), ST_JSON),
    # header checksum
    ("no header checksum", _delete([M, "header_checksum"]), r"metadata has no 'header_checksum'"),
    ("no checksums", _delete([M, "checksums"]), r"metadata has no 'checksums'"),
    ("no objects", _delete([M, "objects"]), r"metadata has no 'objects'"),
]

# edits of the JSON inside the metadata entries "objects" and "checksums"
SUB_CASES = [
    ("object missing part", {"objects": lambda o: o["w"]["parts"].append("zeros")},
     r"object 'w' is missing part 'zeros' \(no tensor 'w.zeros'\)"),
    ("object parts renamed", {"objects": _set(["v", "parts"], ["codes", "scales"])}, r"object 'v' is missing part 'scales'"),
    ("unknown type", {"objects": _set(["w", "type"], "Foo")},
     r"unknown object type 'Foo' for object 'w' \(registered types: .*test_io.Affine"),
    ("type not str", {"objects": _set(["w", "type"], 3)}, r"object 'w': type must be a non-empty str"),
    ("type empty", {"objects": _set(["w", "type"], "")}, r"object 'w': type must be a non-empty str"),
    ("parts not list", {"objects": _set(["w", "parts"], "codes")},
     r"object 'w': parts must be a list of distinct non-empty str"),
    ("parts repeated", {"objects": _set(["w", "parts"], ["codes", "codes", "scale"])}, r"parts must be a list of distinct"),
    ("parts empty name", {"objects": _set(["w", "parts"], ["codes", ""])}, r"parts must be a list of distinct"),
    ("info not object", {"objects": _set(["w", "info"], [3, 4])}, r"object 'w': info must be a JSON object, got list"),
    ("object no info", {"objects": _delete(["w", "info"])},
     r"object 'w': entry must be an object with exactly the keys type, parts, info"),
    ("object extra key", {"objects": _set(["w", "extra"], 1)}, r"object 'w': entry must be an object with exactly"),
    ("object not object", {"objects": _set(["w"], "Affine")}, r"object 'w': entry must be an object"),
    ("object empty name", {"objects": lambda o: o.update({"": o.pop("w")})}, r"metadata 'objects' has an empty object name"),
    ("object named like tensor",
     {"objects": lambda o: o.update({"bias": {"type": "test_io.Liar", "parts": [], "info": {}}})},
     r"name 'bias' is both a tensor and an object"),
    ("from_state rejects rows", {"objects": _set(["w", "info", "rows"], 4)},
     r"object 'w' of type 'test_io.Affine' could not be rebuilt: "
     r"ValueError: Affine codes must be int8 of shape \(4, 4\), got torch.int8 \(3, 4\)"),
    ("from_state rejects cols", {"objects": _set(["v", "info", "cols"], 1)},
     r"object 'v' of type 'test_io.Affine' could not be rebuilt: ValueError: Affine codes must be int8 of shape \(2, 1\)"),
    ("from_state rejects info", {"objects": _delete(["w", "info", "label"])},
     r"could not be rebuilt: ValueError: Affine info needs rows, cols, label"),
    ("from_state rejects parts", {"objects": lambda o: (o.update({"bias": o.pop("w")}),)},
     r"missing part|both a tensor and an object"),
    ("objects swapped types", {"objects": _set(["w", "type"], "test_io.Fragile")},
     r"object 'w' of type 'test_io.Fragile' could not be rebuilt: RuntimeError: fragile parts"),
    ("checksum missing", {"checksums": _delete(["bias"])}, r"no checksum for tensor 'bias'"),
    ("checksum extra", {"checksums": _set(["ghost"], "00000000")},
     r"checksum listed for tensor 'ghost', which is not in the file"),
    ("checksum upper case", {"checksums": _set(["bias"], "ABCDEF12")},
     r"checksum of tensor 'bias' must be 8 lowercase hex digits"),
    ("checksum short", {"checksums": _set(["bias"], "abc")}, r"checksum of tensor 'bias' must be 8 lowercase hex digits"),
    ("checksum int", {"checksums": _set(["bias"], 1234)}, r"checksum of tensor 'bias' must be 8 lowercase hex digits"),
    ("checksum wrong", {"checksums": _set(["w.scale"], "00000000")}, r"checksum mismatch for tensor 'w.scale'"),
    ("checksums swapped", {"checksums": lambda c: c.update({"v.codes": c["w.codes"], "w.codes": c["v.codes"]})},
     r"checksum mismatch for tensor '[vw].codes'"),
]

# whole replacements of a metadata entry by something that is not the JSON it must be
RAW_META_CASES = [
    ("objects", "not json", r"metadata 'objects' is not valid JSON"),
    ("objects", "[]", r"metadata 'objects' must be a JSON object"),
    ("objects", '{"w": NaN}', r"metadata 'objects' contains NaN, which is not JSON"),
    ("objects", '{"a": {}, "a": {}}', r"duplicate key 'a' in JSON"),
    ("objects", "[" * 100_000 + "]" * 100_000, r"metadata 'objects' is not valid JSON"),
    ("checksums", "", r"metadata 'checksums' is not valid JSON"),
    ("checksums", '"abc"', r"metadata 'checksums' must be a JSON object"),
    ("checksums", '{"bias": Infinity}', r"contains Infinity"),
]


@pytest.mark.parametrize("edit,reason", [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES])
def test_bad_header(tmp_path, ref, edit, reason):
    p = tmp_path / "bad.pvq"
    p.write_bytes(rebuild(ref, edit))
    e = assert_format_error(p, reason)
    assert e.path == str(p)
    if "rebuilt" not in reason and "checksum mismatch for" not in reason:
        with pytest.raises(FormatError, match=reason):
            pvq_cuda.read_metadata(p)


@pytest.mark.parametrize("sub,reason", [c[1:] for c in SUB_CASES], ids=[c[0] for c in SUB_CASES])
def test_bad_objects_and_checksums(tmp_path, ref, sub, reason):
    p = tmp_path / "bad.pvq"
    p.write_bytes(rebuild(ref, sub=sub))
    assert_format_error(p, reason)


@pytest.mark.parametrize("key,value,reason", RAW_META_CASES, ids=[f"{c[0]}={c[1][:12]}" for c in RAW_META_CASES])
def test_bad_metadata_json(tmp_path, ref, key, value, reason):
    p = tmp_path / "bad.pvq"
    p.write_bytes(rebuild(ref, _set([M, key], value)))
    assert_format_error(p, reason)


@pytest.mark.parametrize("edit", [
    _set([M, "author"], "someone else"),
    _set([M, "extra"], "x"),
    _delete([M, "author"]),
    _set(["w.codes", "dtype"], "U8"),
    _set(["w.codes", "shape"], [4, 3]),
    _rename,
    lambda h: h[M].update(checksums=h[M]["checksums"].replace("bias", "bias2")) or h.update(bias2=h.pop("bias")),
    lambda h: h[M].update(objects=h[M]["objects"].replace('"label":"w"', '"label":"W"')),
], ids=["meta value", "meta added", "meta removed", "dtype", "shape", "rename", "rename consistently", "info"])
def test_header_edits_without_resealing(tmp_path, ref, edit):
    """Edits that leave a well-formed header are caught by the header checksum."""
    p = tmp_path / "bad.pvq"
    p.write_bytes(rebuild(ref, edit, reseal=False))
    assert_format_error(p, r"header checksum mismatch \(the header was modified or corrupted\)")
    with pytest.raises(FormatError, match="header checksum mismatch"):
        pvq_cuda.read_metadata(p)


def test_version_1_files_load(tmp_path, ref):
    """Files written before the container said format "pt" (version 1) load as before."""
    def as_v1(h):
        h[M]["format"] = "pvq_cuda"
        h[M]["format_version"] = h[M].pop("pvq_cuda_format").replace("2", "1")
    p = tmp_path / "v1.pvq"
    p.write_bytes(rebuild(ref, as_v1))
    assert_loads_as_reference(p, ref)
    assert pvq_cuda.read_metadata(p)["author"] == "test"


def test_unknown_entry_keys_change_nothing(tmp_path, ref):
    """safetensors ignores keys it does not know in a tensor entry, and so do we: they change no
    name, dtype, shape or offset, so the file loads exactly as before."""
    p = tmp_path / "extra.pvq"
    p.write_bytes(rebuild(ref, _set(["bias", "extra"], 1)))
    assert_loads_as_reference(p, ref)


def _raw_header_file(ref: Ref, raw: bytes, n=None) -> bytes:
    return struct.pack("<Q", len(raw) if n is None else n) + raw + ref.buffer


RAW_CASES = [
    # (id, bytes maker, reason)
    ("length zero", lambda r: struct.pack("<Q", 0) + r.data[8:], ST_JSON),
    ("length one more", lambda r: struct.pack("<Q", r.n + 1) + r.data[8:], ST_JSON),
    ("length past end", lambda r: struct.pack("<Q", len(r.data) - 7) + r.data[8:],
     ST_PAST),
    ("length 2**32", lambda r: struct.pack("<Q", 2**32) + r.data[8:], ST_LARGE),
    ("length 2**63", lambda r: struct.pack("<Q", 2**63) + r.data[8:], ST_LARGE),
    ("length max", lambda r: b"\xff" * 8 + r.data[8:], ST_LARGE),
    ("length limit+1", lambda r: struct.pack("<Q", 100_000_001) + r.data[8:], ST_LARGE),
    ("length short by padding", lambda r: struct.pack("<Q", r.n - r.padding) + r.data[8:], ST_FILL),
    ("length short", lambda r: struct.pack("<Q", r.n - r.padding - 1) + r.data[8:], ST_JSON),
    ("length big endian", lambda r: struct.pack(">Q", r.n) + r.data[8:], ST_LARGE),
    ("trailing bytes", lambda r: r.data + b"\0", ST_FILL),
    ("trailing page", lambda r: r.data + bytes(4096), ST_FILL),
    ("header latin-1", lambda r: _raw_header_file(r, r.raw_header.replace(b'"test"', b'"t\xe9st"')),
     ST_UTF8),
    ("header lone continuation", lambda r: _raw_header_file(r, r.raw_header.replace(b'"test"', b'"\x80est"')),
     ST_UTF8),
    ("header surrogate", lambda r: _raw_header_file(r, r.raw_header.replace(b'"test"', b'"\xed\xa0\x80st"')),
     ST_UTF8),
    ("header bom", lambda r: _raw_header_file(r, b"\xef\xbb\xbf" + r.raw_header), ST_JSON),
    ("header nul", lambda r: _raw_header_file(r, r.raw_header.replace(b" ", b"\0")), ST_JSON),
    ("header control char", lambda r: _raw_header_file(r, r.raw_header.replace(b'"test"', b'"te\x01t"')),
     ST_JSON),
    ("header cut brace", lambda r: _raw_header_file(r, r.raw_header.rstrip()[:-1]), ST_JSON),
    ("header extra brace", lambda r: _raw_header_file(r, r.raw_header.rstrip() + b"}"), ST_JSON),
    ("header two objects", lambda r: _raw_header_file(r, r.raw_header.rstrip() + b"{}"), ST_JSON),
    ("header list", lambda r: _raw_header_file(r, b"[1, 2]  "), ST_JSON),
    ("header null", lambda r: _raw_header_file(r, b"null    "), ST_JSON),
    ("header string", lambda r: _raw_header_file(r, b'"{}"    '), ST_JSON),
    ("header empty object", lambda r: _raw_header_file(r, b"{}      "), ST_FILL),
    ("header spaces", lambda r: _raw_header_file(r, b"        "), ST_JSON),
    ("header nesting", lambda r: _raw_header_file(r, b"[" * 200_000 + b"]" * 200_000), ST_JSON),
    ("header NaN", lambda r: _raw_header_file(r, r.raw_header.replace(b"[3,4]", b"[NaN,4]")), ST_JSON),
    ("header single quotes", lambda r: _raw_header_file(r, r.raw_header.replace(b'"bias"', b"'bias'")),
     ST_JSON),
    ("header duplicate tensor", lambda r: _raw_header_file(r, r.raw_header.replace(b'"bias":', b'"mask":', 1)),
     ST_OFFSETS),
    ("header duplicate metadata", lambda r: _raw_header_file(
        r, r.raw_header.rstrip()[:-1] + b',"__metadata__":{"format":"pvq_cuda"}}'), ST_JSON),
    ("header huge int", lambda r: _raw_header_file(r, r.raw_header.replace(b"[3,4]", b"[" + b"9" * 5000 + b",4]")),
     ST_JSON),
    ("not safetensors: text", lambda r: b"hello, world\nthis is a text file\n", ST_LARGE),
    ("not safetensors: zeros", lambda r: bytes(4096), ST_JSON),
    ("not safetensors: random", lambda r: bytes((i * 7919 + 13) % 251 for i in range(3000)), ST_LARGE),
    ("not safetensors: png", lambda r: b"\x89PNG\r\n\x1a\n" + bytes(100), ST_LARGE),
    ("not safetensors: short", lambda r: b"\x08\0\0\0\0\0\0\0{}", ST_PAST),
    ("not safetensors: tiny", lambda r: b"{}", ST_SMALL),
    ("plain safetensors", lambda r: safetensors.torch.save({"x": torch.ones(2)}),
     r"not a pvq_cuda file \(no __metadata__ in the header\)"),
    ("other safetensors metadata", lambda r: safetensors.torch.save({"x": torch.ones(2)}, {"format": "pt"}),
     r"not a pvq_cuda file \(its metadata has no 'pvq_cuda_format'; 'format' is 'pt'\)"),
    ("safetensors no tensors", lambda r: safetensors.torch.save({}, {"format": "pvq_cuda", "format_version": "1"}),
     r"metadata has no 'objects'"),
]


@pytest.mark.parametrize("make,reason", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_bad_raw_file(tmp_path, ref, make, reason):
    p = tmp_path / "bad.pvq"
    p.write_bytes(make(ref))
    assert_format_error(p, reason)
    with pytest.raises(FormatError, match=reason):
        pvq_cuda.read_metadata(p)


def test_torch_save_file_is_not_ours(tmp_path):
    p = tmp_path / "model.pt"
    torch.save({"x": torch.ones(3)}, p)
    assert_format_error(p, f"{ST_LARGE}|{ST_PAST}")


def test_missing_and_special_files(tmp_path):
    missing = tmp_path / "missing.pvq"
    for fn in (pvq_cuda.load, pvq_cuda.read_metadata):
        with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
            fn(missing)
        with pytest.raises(IsADirectoryError):
            fn(tmp_path)
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        assert_format_error(fifo, "not a regular file")  # and no hang waiting for a writer
    if os.path.exists("/dev/zero"):
        assert_format_error(Path("/dev/zero"), "not a regular file")


def test_tensor_claimed_by_two_objects(tmp_path, ref):
    """Object "a" with part "b.c" and object "a.b" with part "c" both claim tensor "a.b.c"."""
    def edit(h):
        h["a.b.c"] = h.pop("bias")
        sums = json.loads(h[M]["checksums"])
        sums["a.b.c"] = sums.pop("bias")
        h[M]["checksums"] = json.dumps(sums)

    liar = {"type": "test_io.Liar", "info": {}}
    p = tmp_path / "bad.pvq"
    p.write_bytes(rebuild(ref, edit, sub={"objects": lambda o: o.update({"a": {**liar, "parts": ["b.c"]},
                                                                         "a.b": {**liar, "parts": ["c"]}})}))
    assert_format_error(p, r"tensor 'a.b.c' is claimed by both object 'a' and object 'a.b'")
    p.write_bytes(rebuild(ref, edit))  # unclaimed, it is just a tensor with dots in its name
    assert same(pvq_cuda.load(p)["a.b.c"], ref.expected["bias"])
