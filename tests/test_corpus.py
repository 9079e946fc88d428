"""Calibration and evaluation windows never overlap; text files are read or rejected clearly."""

import gzip
import json

import pytest
import torch

from pvq_cuda.apps.corpus import make_windows, read_text


def _positions(windows, ids):
    """Start offsets in ids of each window (windows are exact slices of ids)."""
    out = []
    for w in windows:
        hits = [s for s in range(len(ids) - len(w) + 1) if torch.equal(ids[s:s + len(w)], w)]
        assert hits, "a window is not a slice of the token stream"
        out.append(hits[0])
    return out


def test_windows_from_one_text_are_disjoint():
    ids = torch.arange(5000)  # distinct tokens: each window's position is unique
    w = make_windows(ids, nsamples=40, seqlen=64, eval_windows=5, seed=3)
    split = w.info["calibration_tokens"][1]
    assert split == 4500 and w.info["evaluation_tokens"] == [4500, 5000]
    assert max(s + 64 for s in _positions(w.calibration, ids)) <= split
    assert _positions(w.evaluation, ids) == [split + 64 * i for i in range(5)]
    again = make_windows(ids, nsamples=40, seqlen=64, eval_windows=5, seed=3)
    assert torch.equal(w.calibration, again.calibration)  # seeded


def test_windows_from_two_texts():
    w = make_windows(torch.arange(1000), torch.arange(1000, 1300), nsamples=4, seqlen=100, eval_windows=None)
    assert w.evaluation.shape == (3, 100) and int(w.evaluation.min()) == 1000
    assert int(w.calibration.max()) < 1000


def test_windows_reject_short_texts():
    with pytest.raises(ValueError, match="fewer than seqlen"):
        make_windows(torch.arange(100), nsamples=1, seqlen=512)
    with pytest.raises(ValueError, match="evaluation text"):
        make_windows(torch.arange(1000), torch.arange(10), nsamples=1, seqlen=64)


def test_read_text_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert read_text(tmp_path / "a.txt")[0] == "hello world"
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("zipped")
    assert read_text(tmp_path / "b.txt.gz")[0] == "zipped"
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps("two") + "\n")
    assert read_text(tmp_path / "c.jsonl")[0] == "one\n\ntwo"
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1 must be"):
        read_text(tmp_path / "d.jsonl")
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        read_text(tmp_path / "e.txt", "--eval")
    with pytest.raises(FileNotFoundError, match="--calib: no such file"):
        read_text(tmp_path / "missing.txt")
