"""Text for calibration and evaluation, and the token windows cut from it.

The default corpus is the Jargon File 4.4.7 (public domain), from Debian's ``jargon-text``
package: 1.68 MB of English prose, about 407k SmolLM2 tokens, that needs no network at run time
once :func:`setup_corpus` (``pvq-cuda setup``; also run on first use) has fetched it with
``apt-get download`` and unpacked it into the cache directory (``$PVQ_CUDA_CACHE``, by default
``~/.cache/pvq_cuda``; never inside the repository).

Calibration and evaluation never overlap: from one text, calibration windows are drawn only from
the first ``1 - holdout`` share of its tokens and evaluation windows only from the rest; from two
texts, each comes from its own.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

JARGON_PACKAGE = "jargon-text"
JARGON_VERSION = "4.4.7-4.1"
JARGON_MEMBER = "usr/share/doc/jargon-text/jargon.txt.gz"
DEFAULT_CORPUS_NAME = f"Jargon File 4.4.7 (Debian {JARGON_PACKAGE} {JARGON_VERSION})"
DEFAULT_HOLDOUT = 0.1  # share of a single text's tokens, at its end, kept for evaluation


def cache_dir() -> Path:
    """Where downloaded data and converted models live: ``$PVQ_CUDA_CACHE`` or ``~/.cache/pvq_cuda``."""
    env = os.environ.get("PVQ_CUDA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pvq_cuda"


def default_corpus_path() -> Path:
    return cache_dir() / "corpus" / "jargon.txt"


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise RuntimeError(f"pvq-cuda setup: {cmd[0]} is not installed; the default corpus comes from the Debian "
                           f"package {JARGON_PACKAGE}. Pass --calib/--eval with a local text file instead") from e


def setup_corpus(force: bool = False, quiet: bool = False) -> Path:
    """Fetch the Jargon File into the cache (``apt-get download`` + ``dpkg-deb -x``); returns its path.

    Needs Debian's package index: when ``apt-get download`` fails and we are root, ``apt-get update``
    is run once and the download retried.
    """
    target = default_corpus_path()
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".setup-") as tmp:
        tmpdir = Path(tmp)
        spec = f"{JARGON_PACKAGE}={JARGON_VERSION}"
        if not quiet:
            print(f"pvq-cuda setup: apt-get download {spec}", flush=True)
        res = _run(["apt-get", "download", spec], tmpdir)
        if res.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            if not quiet:
                print("pvq-cuda setup: apt-get update (the package index is missing or stale)", flush=True)
            _run(["apt-get", "update", "-qq"], tmpdir)
            res = _run(["apt-get", "download", spec], tmpdir)
        debs = list(tmpdir.glob(f"{JARGON_PACKAGE}_*.deb"))
        if res.returncode != 0 or not debs:
            raise RuntimeError(f"pvq-cuda setup: `apt-get download {spec}` failed ({res.stderr.strip()[-300:]}). "
                               f"Run `apt-get update` as root and retry, or pass --calib/--eval with a local text")
        res = _run(["dpkg-deb", "-x", str(debs[0]), str(tmpdir / "x")], tmpdir)
        member = tmpdir / "x" / JARGON_MEMBER
        if res.returncode != 0 or not member.is_file():
            raise RuntimeError(f"pvq-cuda setup: could not unpack {debs[0].name}: {res.stderr.strip()[-300:]}")
        part = tmpdir / "jargon.txt"
        with gzip.open(member, "rb") as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, target)
    if not quiet:
        print(f"pvq-cuda setup: corpus at {target}", flush=True)
    return target


def read_text(path: str | os.PathLike | None, what: str = "--calib") -> tuple[str, str]:
    """(text, name) of a local .txt, .txt.gz or .jsonl file (a "text" field per line), or of the
    default corpus when ``path`` is None."""
    if path is None:
        p = setup_corpus(quiet=True) if not default_corpus_path().is_file() else default_corpus_path()
        return p.read_text(encoding="utf-8"), DEFAULT_CORPUS_NAME
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file: {str(p)!r}")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        raw = f.read()
    stem = p.name[:-3] if p.suffix == ".gz" else p.name
    if stem.endswith(".jsonl"):
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: {str(p)!r} line {lineno} is not JSON: {e}") from e
            if isinstance(obj, str):
                texts.append(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                texts.append(obj["text"])
            else:
                raise ValueError(f"{what}: {str(p)!r} line {lineno} must be a string or an object with a 'text' string")
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise ValueError(f"{what}: {str(p)!r} holds no text")
    return raw, p.name


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids (int64, 1-D) without special tokens (transformers 4.x and 5.x agree on these)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def leading_bos(tokenizer) -> int | None:
    """The BOS token id that ``tokenizer`` puts before every text it encodes (Gemma's and
    Llama-2's do), or None where it adds none (SmolLM2's, Qwen's; a BOS token that is defined but
    not added, as SmolLM2's <|im_start|>, does not count). Windows for a model whose tokenizer adds
    one must start with it: :func:`make_windows` (``bos_token_id``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bos if ids[:1] == [bos] and plain[:1] != [bos] else None


@dataclass
class Windows:
    """Calibration windows ``[nsamples, seqlen]`` and evaluation windows ``[m, eval_seqlen]``."""

    calibration: torch.Tensor
    evaluation: torch.Tensor
    info: dict = field(default_factory=dict)


def make_windows(calib_ids: torch.Tensor, eval_ids: torch.Tensor | None = None, *, nsamples: int = 64,
                 seqlen: int = 512, eval_windows: int | None = 16, eval_seqlen: int | None = None, seed: int = 0,
                 holdout: float = DEFAULT_HOLDOUT, bos_token_id: int | None = None) -> Windows:
    """Cut calibration and held-out evaluation windows.

    ``eval_ids=None``: both come from ``calib_ids``, calibration from its first ``1 - holdout`` of
    tokens, evaluation from the rest. Calibration windows start at seeded random offsets (they may
    overlap each other, never the evaluation part); evaluation windows are the first
    ``eval_windows`` consecutive, non-overlapping ones of the evaluation part (None: all of them).

    ``bos_token_id`` (:func:`leading_bos` of the model's tokenizer; None where it adds no BOS):
    every window, calibration and evaluation, starts with this token, as every text did in the
    model's training (issue 18: Gemma-family models score 2-3x worse on windows without it). It takes the
    place of the window's first text token, which is context only, never scored (as llama.cpp's
    perplexity does): windows are cut at the same places and score the same tokens either way.
    """
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"make_windows: nsamples must be >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    eval_seqlen = eval_seqlen or seqlen
    if eval_ids is None:
        if not 0 < holdout < 1:
            raise ValueError(f"make_windows: holdout must be in (0, 1), got {holdout}")
        split = int(len(calib_ids) * (1 - holdout))
        calib_part, eval_part = calib_ids[:split], calib_ids[split:]
        regions = {"calibration_tokens": [0, split], "evaluation_tokens": [split, len(calib_ids)]}
    else:
        calib_part, eval_part = calib_ids, eval_ids
        regions = {"calibration_tokens": [0, len(calib_ids)], "evaluation_tokens": [0, len(eval_ids)],
                   "separate_files": True}
    if len(calib_part) < seqlen:
        raise ValueError(f"make_windows: the calibration text has {len(calib_part)} tokens, fewer than seqlen={seqlen}")
    if len(eval_part) < eval_seqlen:
        raise ValueError(f"make_windows: the evaluation text has {len(eval_part)} tokens, fewer than one window of "
                         f"{eval_seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(calib_part) - seqlen + 1, (nsamples,), generator=gen)
    calibration = torch.stack([calib_part[s:s + seqlen] for s in starts.tolist()])
    m = len(eval_part) // eval_seqlen
    if eval_windows is not None:
        m = min(m, eval_windows)
    evaluation = eval_part[: m * eval_seqlen].reshape(m, eval_seqlen).clone()  # not a view of eval_ids
    info = {"nsamples": nsamples, "seqlen": seqlen, "seed": seed, "eval_windows": m, "eval_seqlen": eval_seqlen,
            **regions}
    if bos_token_id is not None:
        calibration[:, 0] = bos_token_id
        evaluation[:, 0] = bos_token_id
        info["bos_token_id"] = bos_token_id
    return Windows(calibration, evaluation, info)
