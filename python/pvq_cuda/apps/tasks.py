"""`pvq-cuda eval --tasks`: lm-evaluation-harness tasks on a model, from local task files only.

The shipped task ``pvq_heldout`` is built at run time from the held-out text: ``--eval FILE``, or
else the last 10 % of the calibration text's tokens (the part calibration never sees), decoded
back to text and cut into documents.
"""

from __future__ import annotations

import json
import tempfile

from ..integrations.lm_eval_harness import PERPLEXITY_TASK, evaluate, held_out_documents, write_perplexity_task
from .corpus import DEFAULT_HOLDOUT, read_text, tokenize
from .loading import load_model


def held_out_text(args, tokenizer) -> tuple[str, str]:
    """The text pvq_heldout scores, and where it comes from."""
    if args.eval is not None:
        text, name = read_text(args.eval, "--eval")
        return text, name
    text, name = read_text(args.calib, "--calib")
    ids = tokenize(tokenizer, text)
    split = int(len(ids) * (1 - DEFAULT_HOLDOUT))  # the split make_windows uses
    return tokenizer.decode(ids[split:]), f"{name}, held-out last 10% of its tokens"


def cmd_eval_tasks(args) -> int:
    from .jobs import _device

    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise ValueError("--tasks: give at least one task name")
    device = _device(args)
    lm = load_model(args.model, device=device, quiet=True)
    if lm.tokenizer is None:
        raise ValueError(f"--model {args.model}: no tokenizer was saved with this model")
    with tempfile.TemporaryDirectory(prefix="pvq-tasks-") as tmp:
        dirs = list(args.task_dir or [])
        source = None
        if PERPLEXITY_TASK in tasks:
            text, source = held_out_text(args, lm.tokenizer)
            dirs.append(str(write_perplexity_task(tmp, held_out_documents(text), source=source)))
        out = evaluate(lm.model, lm.tokenizer, tasks, dirs, batch_size=args.batch_size, limit=args.limit,
                       max_length=args.eval_seqlen)
    results = {task: {k: v for k, v in metrics.items() if not k.startswith("alias")}
               for task, metrics in out["results"].items()}
    if args.json:
        print(json.dumps({"model": lm.name, "kind": lm.kind, "results": results, "pvq_heldout_source": source},
                         default=str))
        return 0
    from lm_eval.utils import make_table

    print(f"model: {lm.name} ({lm.kind}); device {device}")
    if source:
        print(f"{PERPLEXITY_TASK}: {source}")
    print(make_table(out))
    return 0
