"""Calibration and evaluation windows never overlap; text files are read or rejected clearly."""

import gzip
import json

import pytest
import torch

from pvq_cuda.apps.corpus import make_domain_windows, make_windows, read_text


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


def test_windows_start_with_bos_when_given_one():
    """With bos_token_id every calibration and evaluation window starts with it, in place of its
    first text token (context only, never scored): the windows are cut at the same places and the
    scored tokens are the same; without it the windows are exact slices of the text."""
    ids = torch.randint(3, 500, (4000,), generator=torch.Generator().manual_seed(4))
    plain = make_windows(ids, nsamples=6, seqlen=32, eval_windows=4, seed=2)
    bos = make_windows(ids, nsamples=6, seqlen=32, eval_windows=4, seed=2, bos_token_id=1)
    for a, b in ((plain.calibration, bos.calibration), (plain.evaluation, bos.evaluation)):
        assert (b[:, 0] == 1).all() and (a[:, 0] != 1).all()
        assert torch.equal(a[:, 1:], b[:, 1:])
    assert bos.info["bos_token_id"] == 1 and "bos_token_id" not in plain.info
    assert int(ids.min()) >= 3  # the BOS went into the windows only, not into the caller's tokens
    _positions(plain.evaluation, ids)
    other = torch.randint(3, 500, (2000,), generator=torch.Generator().manual_seed(5))
    mixed = make_domain_windows({"a": ids, "b": other}, {"a": ids, "b": other, "c": other[:500]}, nsamples=5,
                                seqlen=32, eval_windows=3, whole=frozenset({"c"}), bos_token_id=1)
    assert all((w[:, 0] == 1).all() for w in (mixed.calibration, *mixed.evaluation.values()))
    assert int(other.min()) >= 3


def test_leading_bos_follows_what_the_tokenizer_does():
    """A tokenizer that starts every text with BOS (Gemma's) gives its id; one whose BOS token is
    defined but not added (SmolLM2's <|im_start|>) or that has none gives None."""
    pytest.importorskip("transformers")
    from pvq_cuda.apps.corpus import leading_bos
    from tiny_llama import tiny_tokenizer

    adds = tiny_tokenizer(bos="added")
    assert adds("ab")["input_ids"][0] == adds.bos_token_id == 97
    assert leading_bos(adds) == 97
    assert leading_bos(tiny_tokenizer(bos="unused")) is None
    assert leading_bos(tiny_tokenizer()) is None


@pytest.mark.parametrize("bos", ["added", None])
def test_job_windows_start_the_way_the_model_expects(tmp_path, bos):
    """pvq-cuda's jobs cut their windows from the model's tokenizer: with one that adds BOS every
    window starts with it; with one that does not (the default model's case) the windows are the
    plain slices of the text, as before."""
    pytest.importorskip("transformers")
    import argparse

    from pvq_cuda.apps.corpus import tokenize
    from pvq_cuda.apps.jobs import prepare
    from tiny_llama import TEXT, tiny_tokenizer, write_tiny_model_dir

    write_tiny_model_dir(tmp_path / "model", bos=bos)
    (tmp_path / "text.txt").write_text(TEXT)
    args = argparse.Namespace(model=str(tmp_path / "model"), calib=str(tmp_path / "text.txt"), eval=None,
                              nsamples=4, seqlen=32, eval_windows=3, eval_seqlen=None, seed=0, device="cpu")
    job = prepare(args)
    plain = make_windows(tokenize(tiny_tokenizer(bos), TEXT), nsamples=4, seqlen=32, eval_windows=3, seed=0)
    (evaluation,) = job.evaluation.values()  # the text's held-out part
    for got, text_only in ((job.calibration, plain.calibration), (evaluation, plain.evaluation)):
        assert torch.equal(got[:, 1:], text_only[:, 1:])
        assert torch.equal(got[:, 0], torch.full_like(got[:, 0], 97) if bos else text_only[:, 0])
    assert job.data_info.get("bos_token_id") == (97 if bos else None)


@pytest.mark.parametrize("workers", [None, 1, 3])
def test_tokenize_all_gives_each_text_its_own_ids(workers):
    """Several texts encoded at once give exactly what encoding each alone gives, in the order
    they were passed."""
    pytest.importorskip("transformers")
    from pvq_cuda.apps.corpus import tokenize, tokenize_all
    from tiny_llama import TEXT, tiny_tokenizer

    tok = tiny_tokenizer("added")
    texts = {"short": TEXT[:50], "long": TEXT * 20, "middle": TEXT[::-1] * 3, "empty-ish": "\n"}
    got = tokenize_all(tok, texts, workers=workers)
    assert list(got) == list(texts)
    for name, text in texts.items():
        assert torch.equal(got[name], tokenize(tok, text)), name
        assert len(got[name]) == len(text)  # one token per character, no BOS (add_special_tokens=False)


def test_tokenize_all_encodes_one_at_a_time_with_a_tokenizer_that_cannot_be_copied():
    pytest.importorskip("transformers")
    from pvq_cuda.apps.corpus import tokenize, tokenize_all
    from tiny_llama import TEXT, tiny_tokenizer

    class Uncopyable:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def __deepcopy__(self, memo):
            raise TypeError("cannot copy this tokenizer")

    tok = Uncopyable(tiny_tokenizer())
    texts = {"a": TEXT, "b": TEXT[:77]}
    got = tokenize_all(tok, texts, workers=2)
    assert list(got) == ["a", "b"]
    for name, text in texts.items():
        assert torch.equal(got[name], tokenize(tok.inner, text))
