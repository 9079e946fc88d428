"""lm-evaluation-harness on a model in memory (a PVQ model included), with tasks from local files.

lm-eval's own command line cannot load PVQ layers (it has no plugin hook), so ``pvq-cuda eval
--tasks`` builds the model here and hands it to lm-eval as ``HFLM(pretrained=<model>)``. Tasks are
lm-eval task YAMLs found in ``task_dirs`` (``TaskManager(include_path=...)``) besides lm-eval's
own; their data must be local (``dataset_path: json`` with ``data_files``): nothing is downloaded.

:func:`write_perplexity_task` makes the task pvq_cuda ships: rolling log-likelihood of held-out
documents, reported as word perplexity, byte perplexity and bits per byte, the figures papers
quote (the GPTQ-style token perplexity is ``pvq-cuda eval`` without ``--tasks``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..format.atomic import write_text

PERPLEXITY_TASK = "pvq_heldout"


def write_perplexity_task(directory: str | os.PathLike, documents: Sequence[str], name: str = PERPLEXITY_TASK,
                          source: str = "") -> Path:
    """Write the held-out perplexity task ``name`` (its YAML and its JSONL of ``documents``) into
    ``directory``; returns the directory, for ``task_dirs``."""
    docs = [d for d in documents if d.strip()]
    if not docs:
        raise ValueError(f"{name}: no held-out documents to evaluate on")
    out = Path(directory)
    data = out / f"{name}.jsonl"
    write_text(data, "".join(json.dumps({"text": d}) + "\n" for d in docs))
    write_text(out / f"{name}.yaml", "\n".join([
        f"# written by pvq_cuda: rolling log-likelihood of {len(docs)} held-out documents{' of ' + source if source else ''}",
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "should_decontaminate: false",
        "metric_list:",
        "  - metric: word_perplexity",
        "  - metric: byte_perplexity",
        "  - metric: bits_per_byte",
        "metadata:",
        "  version: 1.0",
        "",
    ]))
    return out


def held_out_documents(text: str, chars: int = 4000) -> list[str]:
    """Cut a held-out text into documents of about ``chars`` characters at paragraph breaks (lm-eval
    scores each document on its own, with the model's context rolling over long ones)."""
    docs, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + len(para) > chars:
            docs.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current.strip():
        docs.append(current)
    return docs


def evaluate(model, tokenizer, tasks: Sequence[str], task_dirs: Sequence[str | os.PathLike] = (), *,
             batch_size: int = 1, limit: int | float | None = None, max_length: int | None = None) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``model`` (already built, e.g. by load_quantized) for
    ``tasks``; returns lm-eval's results dict (``results[task][metric]``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for d in task_dirs:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--task-dir: no such directory: {str(d)!r}")
    manager = TaskManager(include_path=[str(d) for d in task_dirs] or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}: give a --task-dir holding their YAML "
                         f"(lm-eval task files whose data is local), or use {PERPLEXITY_TASK!r}")
    # Rolling log-likelihoods start from a prefix token: lm-eval takes BOS or EOS from the tokenizer;
    # a tokenizer with neither falls back on the model config's BOS.
    prefix = None
    if getattr(tokenizer, "bos_token_id", None) is None and getattr(tokenizer, "eos_token_id", None) is None:
        prefix = getattr(model.config, "bos_token_id", None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(next(model.parameters()).device), prefix_token_id=prefix)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                          bootstrap_iters=0)
    return out


__all__ = ["PERPLEXITY_TASK", "evaluate", "held_out_documents", "write_perplexity_task"]
