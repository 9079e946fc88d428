"""Text for calibration and evaluation, and the token windows cut from it.

A text source is a named domain (``jargon``, ``python-docs``, ... : :mod:`pvq_cuda.apps.domains`,
each from a Debian package, fetched once into the cache with ``pvq-cuda setup``) or a local file
(.txt, .txt.gz, or .jsonl with a "text" field). The default calibration text is the Jargon File;
the default evaluation runs on every domain.

Calibration and evaluation never overlap: a source's first ``1 - holdout`` share of tokens is for
calibration and the rest for evaluation; an evaluation file that calibration does not use is
evaluated whole.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import os
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .domains import CALIBRATION_DOMAIN, DOMAINS, read_domain, setup_domain

DEFAULT_HOLDOUT = 0.1  # share of a text's tokens, at its end, kept for evaluation


def setup_corpus(force: bool = False, quiet: bool = False) -> list[Path]:
    """Fetch every text domain into the cache (``pvq-cuda setup``); returns their files."""
    return [setup_domain(name, force=force, quiet=quiet) for name in DOMAINS]


def read_source(spec: str, what: str = "--calib") -> tuple[str, str]:
    """(text, description) of a domain name or a local file path."""
    if spec in DOMAINS:
        return read_domain(spec)
    if not Path(spec).exists() and os.sep not in spec and "." not in spec:
        raise ValueError(f"{what}: {spec!r} is neither a text domain ({', '.join(DOMAINS)}) nor a file")
    return read_text(spec, what)


def read_text(path: str | os.PathLike | None, what: str = "--calib") -> tuple[str, str]:
    """(text, name) of a local .txt, .txt.gz or .jsonl file (a "text" field per line), or of the
    default calibration text (the Jargon File) when ``path`` is None."""
    if path is None:
        return read_domain(CALIBRATION_DOMAIN)
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


def tokenize_all(tokenizer, texts: Mapping[str, str], workers: int | None = None) -> dict[str, torch.Tensor]:
    """:func:`tokenize` of each text, several texts at once (the default job's five texts took 19 s
    one after another on 2 cores, 11 s two at a time: the Rust tokenizers release the GIL).

    Each text is still encoded whole, so the ids are exactly :func:`tokenize`'s. Each worker thread
    encodes with a tokenizer of its own (``tokenizer`` or a deep copy): an encode call may reset
    the tokenizer's padding and truncation, which a concurrent call on the same object would
    collide with. A tokenizer that cannot be copied is used one text at a time. The longest texts
    start first. ``workers``: threads (default: the CPU count, at most one per text)."""
    workers = min(len(texts), workers or os.cpu_count() or 1)
    tokenizers = queue.SimpleQueue()
    tokenizers.put(tokenizer)
    try:
        for _ in range(workers - 1):
            tokenizers.put(copy.deepcopy(tokenizer))
    except Exception:  # any failure to copy (unpicklable state, ...) means: no parallel encoding
        workers = 1
    if workers <= 1:
        return {name: tokenize(tokenizer, text) for name, text in texts.items()}
    local = threading.local()

    def encode(text: str) -> torch.Tensor:
        if not hasattr(local, "tokenizer"):
            local.tokenizer = tokenizers.get_nowait()  # the pool starts at most `workers` threads
        return tokenize(local.tokenizer, text)

    order = sorted(texts, key=lambda name: len(texts[name]), reverse=True)
    with ThreadPoolExecutor(workers) as pool:
        ids = dict(zip(order, pool.map(encode, (texts[name] for name in order))))
    return {name: ids[name] for name in texts}


def leading_bos(tokenizer) -> int | None:
    """The BOS token id that ``tokenizer`` puts before every text it encodes (Gemma's and
    Llama-2's do), or None where it adds none (SmolLM2's, Qwen's; a BOS token that is defined but
    not added, as SmolLM2's <|im_start|>, does not count). Windows for a model whose tokenizer adds
    one must start with it: :func:`make_domain_windows` (``bos_token_id``)."""
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
    """Cut calibration and held-out evaluation windows from one text (``eval_ids=None``), or from a
    calibration text and a separate evaluation text (evaluated whole): :func:`make_domain_windows`
    with one source each. Calibration windows come from the first ``1 - holdout`` of the
    calibration text's tokens, at seeded random offsets (they may overlap each other, never the
    evaluation part); evaluation windows are the first ``eval_windows`` consecutive, non-overlapping
    ones of the evaluation part (None: all of them). ``bos_token_id``: see :func:`make_domain_windows`."""
    calib_name, eval_name = ("text", "text") if eval_ids is None else ("calibration", "evaluation")
    d = make_domain_windows({calib_name: calib_ids}, {eval_name: calib_ids if eval_ids is None else eval_ids},
                            nsamples=nsamples, seqlen=seqlen, eval_windows=eval_windows, eval_seqlen=eval_seqlen,
                            seed=seed, holdout=holdout, bos_token_id=bos_token_id,
                            whole=frozenset() if eval_ids is None else frozenset({eval_name}))
    evaluation = d.evaluation[eval_name]
    sources = d.info["sources"]
    return Windows(d.calibration, evaluation, {**d.info, "eval_windows": evaluation.shape[0],
                                               "calibration_tokens": sources[calib_name]["calibration_tokens"],
                                               "evaluation_tokens": sources[eval_name]["evaluation_tokens"]})


@dataclass
class DomainWindows:
    """Calibration windows ``[nsamples, seqlen]`` mixed from one or more sources, and evaluation
    windows ``[m, eval_seqlen]`` per evaluation source (in the order given)."""

    calibration: torch.Tensor
    evaluation: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)


def make_domain_windows(calib: Mapping[str, torch.Tensor], evaluation: Mapping[str, torch.Tensor], *,
                        nsamples: int = 64, seqlen: int = 512, eval_windows: int | None = 16,
                        eval_seqlen: int | None = None, seed: int = 0, holdout: float = DEFAULT_HOLDOUT,
                        whole: frozenset[str] = frozenset(), bos_token_id: int | None = None) -> DomainWindows:
    """Cut calibration windows from the first ``1 - holdout`` of each ``calib`` source's tokens
    (``nsamples`` split as evenly as the sources allow, first sources taking the remainder; seeded
    random starts per source), and evaluation windows, the first ``eval_windows`` consecutive ones,
    from the last ``holdout`` of each ``evaluation`` source, or from all of it for the sources in
    ``whole`` (files that calibration does not read).

    ``bos_token_id`` (:func:`leading_bos` of the model's tokenizer; None where it adds no BOS):
    every window, calibration and evaluation, starts with this token, as every text did in the
    model's training (issue 18: Gemma-family models score 2-3x worse on windows without it). It
    takes the place of the window's first text token, which is context only, never scored (as
    llama.cpp's perplexity does): windows are cut at the same places and score the same tokens
    either way."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"make_windows: nsamples must be >= 1 and seqlen >= 2, got {nsamples}, {seqlen}")
    if not evaluation:
        raise ValueError("make_windows: give at least one evaluation text")
    if not 0 < holdout < 1:
        raise ValueError(f"make_windows: holdout must be in (0, 1), got {holdout}")
    overlap = set(whole) & set(calib)
    if overlap:
        raise ValueError(f"make_windows: {sorted(overlap)} would be evaluated whole but also calibrate")
    eval_seqlen = eval_seqlen or seqlen
    gen = torch.Generator().manual_seed(seed)
    share = [nsamples // len(calib) + (k < nsamples % len(calib)) for k in range(len(calib))] if calib else []
    windows, regions = [], {}
    for (name, ids), count in zip(calib.items(), share):
        part = ids[: int(len(ids) * (1 - holdout))]
        if len(part) < seqlen:
            raise ValueError(f"make_windows: the calibration text {name!r} has {len(part)} tokens before its "
                             f"held-out part, fewer than seqlen={seqlen}")
        starts = torch.randint(0, len(part) - seqlen + 1, (count,), generator=gen)
        windows += [part[s:s + seqlen] for s in starts.tolist()]
        regions[name] = {"calibration_tokens": [0, len(part)], "samples": count}
    per_domain = {}
    for name, ids in evaluation.items():
        begin = 0 if name in whole else int(len(ids) * (1 - holdout))
        part = ids[begin:]
        m = len(part) // eval_seqlen
        if eval_windows is not None:
            m = min(m, eval_windows)
        if m < 1:
            raise ValueError(f"make_windows: the evaluation text {name!r} has {len(part)} held-out tokens, fewer "
                             f"than one window of {eval_seqlen}")
        per_domain[name] = part[: m * eval_seqlen].reshape(m, eval_seqlen).clone()  # not a view of the caller's ids
        regions.setdefault(name, {})["evaluation_tokens"] = [begin, len(ids)]
    info = {"nsamples": nsamples, "seqlen": seqlen, "seed": seed, "eval_seqlen": eval_seqlen,
            "eval_windows": {n: w.shape[0] for n, w in per_domain.items()}, "sources": regions}
    calibration = torch.stack(windows) if windows else torch.empty(0, seqlen, dtype=torch.long)  # eval only
    if bos_token_id is not None:
        for w in (calibration, *per_domain.values()):
            w[:, 0] = bos_token_id
        info["bos_token_id"] = bos_token_id
    return DomainWindows(calibration, per_domain, info)


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))
