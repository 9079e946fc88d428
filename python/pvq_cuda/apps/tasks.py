"""`pvq-cuda eval --tasks`: lm-evaluation-harness tasks on a model, from local task files only.

The shipped task ``pvq_heldout`` is built at run time from the held-out text of each evaluation
source (the options of ``pvq-cuda eval``: by default every text domain), one task per source,
``pvq_heldout_<source>``: a domain's last 10 % of tokens (the part calibration never sees), decoded
back to text and cut into documents, or a whole evaluation file that calibration does not read.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from ..integrations.lm_eval_harness import PERPLEXITY_TASK, evaluate, held_out_documents, write_perplexity_task
from .corpus import DEFAULT_HOLDOUT, read_source, tokenize_all
from .domains import DOMAINS
from .loading import load_model


def held_out_texts(args, tokenizer) -> dict[str, tuple[str, str]]:
    """{source: (held-out text, description)} for each evaluation source of the options."""
    from .jobs import _sources

    calib, evaluation = _sources(args, need_calibration=False)
    out = {spec: read_source(spec, "--eval") for spec in evaluation}
    held = [spec for spec in evaluation if spec in DOMAINS or spec in calib]
    for spec, ids in tokenize_all(tokenizer, {spec: out[spec][0] for spec in held}).items():
        text = tokenizer.decode(ids[int(len(ids) * (1 - DEFAULT_HOLDOUT)):])  # the split make_windows uses
        out[spec] = (text, out[spec][1] + ", held-out last 10% of its tokens")
    return out


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
        sources = {}
        if PERPLEXITY_TASK in tasks:
            at = tasks.index(PERPLEXITY_TASK)
            per_source = []
            for spec, (text, description) in held_out_texts(args, lm.tokenizer).items():
                name = f"{PERPLEXITY_TASK}_{re.sub(r'[^A-Za-z0-9]+', '_', Path(spec).stem if spec not in DOMAINS else spec)}"
                write_perplexity_task(tmp, held_out_documents(text), name=name, source=description)
                sources[name] = description
                per_source.append(name)
            tasks[at:at + 1] = per_source
            dirs.append(tmp)
        out = evaluate(lm.model, lm.tokenizer, tasks, dirs, batch_size=args.batch_size, limit=args.limit,
                       max_length=args.eval_seqlen)
    results = {task: {k: v for k, v in metrics.items() if not k.startswith("alias")}
               for task, metrics in out["results"].items()}
    if args.json:
        print(json.dumps({"model": lm.name, "kind": lm.kind, "results": results, "pvq_heldout_sources": sources},
                         default=str))
        return 0
    from lm_eval.utils import make_table

    print(f"model: {lm.name} ({lm.kind}); device {device}")
    for name, description in sources.items():
        print(f"{name}: {description}")
    print(make_table(out))
    return 0
