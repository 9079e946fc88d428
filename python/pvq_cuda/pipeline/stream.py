"""Carrying the calibration activations through a model block by block, for one run or for several
runs on copies of one model that share the fp model's pass."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..layers.decoder import linears
from .capture import block_inputs, first, to_device
from .generic import generic_block
from .groups import block_structure, call_order_groups, kept
from .llama import LlamaFlow, staged_block
from .run import Run, block_to, decoded_cache, finish
from .tune import tune_pending


def fp_block_pass(block: nn.Module, fp_hidden: list[torch.Tensor], extra, dev, store):
    """Run the still unquantized ``block`` on the fp stream (``extra[c]``: its other arguments on
    chunk c): every linear's input per chunk, and the block's outputs (the fp stream's next
    activations)."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in linears(block)}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0].detach().to(store)))
               for n, m in linears(block).items()]
    try:
        out = []
        for c, h in enumerate(fp_hidden):
            a, kw = extra[c]
            out.append(first(block(h.to(dev), *to_device(a, dev), **to_device(kw, dev))).to(store))
    finally:
        for hd in handles:
            hd.remove()
    return inputs, out


def execute(runs: list[Run]) -> None:
    """Quantize every run's model; runs that can share the fp model's pass go in lockstep."""
    together = [r for r in runs if r.fp_targets and r.resume is None]
    if len(together) < 2:
        together = []
    try:
        for run in runs:
            if run in together:
                continue
            t_start = time.perf_counter()
            try:
                with torch.no_grad():
                    if run.method.hessian:
                        run_pipeline(run)
                    else:
                        data_free(run)
            finally:
                decoded_cache(run.model, False)
            finish(run, time.perf_counter() - t_start)
        if together:
            lockstep(together)
    finally:
        for bar in {id(r.bar): r.bar for r in runs if r.bar is not None}.values():
            bar.close()


def lockstep(runs: list[Run]) -> None:
    """Runs on copies of one model, block by block: the fp model's pass over each block is made
    once, by the first run's still unquantized copy, and shared. Each run's ``seconds`` is its own
    work plus the whole shared pass (what it would take alone); ``shared_seconds`` is that pass."""
    own, shared = [0.0] * len(runs), 0.0
    try:
        with torch.no_grad():
            streams = []
            for k, run in enumerate(runs):
                t = time.perf_counter()
                streams.append(Stream(run))
                own[k] += time.perf_counter() - t
            lead = streams[0]
            for s in streams[1:]:
                s.fp_hidden = None  # only the lead carries the fp stream
            for i in range(len(lead.layers)):
                t = time.perf_counter()
                check_copies(i, [s.layers[i] for s in streams])
                fp_inputs = lead.fp_pass(i)
                for s in streams[1:]:
                    s.fp_hidden = lead.fp_hidden  # the fp block's outputs: the others' tuning targets
                shared += time.perf_counter() - t
                for k, s in enumerate(streams):
                    t = time.perf_counter()
                    s.quantize_block(i, fp_inputs)
                    own[k] += time.perf_counter() - t
                del fp_inputs
    finally:
        for run in runs:
            decoded_cache(run.model, False)
    for k, run in enumerate(runs):
        run.log["shared_seconds"] = shared
        finish(run, own[k] + shared)


def check_copies(i: int, blocks: list[nn.Module]) -> None:
    """The fp pass of block ``i`` is made on the first model's copy: every copy must be the same."""
    ref = list(blocks[0].state_dict().values())
    for k, b in enumerate(blocks[1:], 1):
        other = list(b.state_dict().values())
        if len(other) != len(ref) or not all(torch.equal(x, y.to(x.device)) for x, y in zip(ref, other)):
            raise ValueError(f"quantize_models: models[{k}] is not a copy of models[0] (block {i} differs)")


def data_free(run: Run) -> None:
    ignore_re, resume = run.ignore, run.resume
    for i, block in enumerate(run.layers):
        prefix = f"model.layers.{i}."
        if resume is not None and resume.block_path(i).exists():
            block_to(block, run, run.device)
            entries, _ = resume.load_block(i, block, run.device)  # data-free: no tuning
            for e in entries:
                run.record(e)
            block_to(block, run, "cpu")
            continue
        block_to(block, run, run.device)
        entries_from = len(run.log["layers"])
        for rel, lin in linears(block).items():
            if ignore_re is not None and ignore_re.search(prefix + rel):
                continue
            run.quantize_layer(block, prefix, rel, None, 0.0, i)
        decoded_cache(block, False)
        if resume is not None:
            resume.save_block(i, block, prefix, run.log["layers"][entries_from:])
        block_to(block, run, "cpu")
        run.write_log()


@dataclass(frozen=True)
class Plan:
    """How a kind of block is quantized: ``staged`` (llama.staged_block), or generic with its
    linears in ``groups`` (groups.call_order_groups)."""

    staged: bool
    groups: list[list[str]] | None


class Stream:
    """One run's calibration activations, carried through its model block by block (steps 1-3 of
    the module docstring). :meth:`fp_pass` runs the unquantized block on the fp model's stream
    (fp targets); :meth:`quantize_block` quantizes a block and moves the stream past it. Several
    runs on copies of one model can share one fp stream (:func:`quantize_models`). ``chunks``
    (default: the run's) are the calibration token ids it carries."""

    def __init__(self, run: Run, chunks: list[torch.Tensor] | None = None) -> None:
        self.run, self.layers = run, run.layers
        self.chunks = run.chunks if chunks is None else chunks
        model, dev, layers = run.model, run.device, run.layers
        self.dev = dev
        self.store = torch.device("cpu") if run.offload else dev  # where activations wait between forwards

        # 1. inputs of block 0, and every block's other arguments (extra[c][i]: chunk c, block i;
        # blocks of one layer type share the same tensors). With offload, the small non-block
        # modules (embeddings, rotary embedding, final norm) visit the device for this step only.
        others = [c for n, c in model.model.named_children() if n != "layers"]
        if run.offload:
            for c in others:
                c.to(dev)
        self.hidden, self.extra = [], []
        for ids in self.chunks:
            hs, extras = block_inputs(model, layers, ids.to(dev))
            self.hidden.append(hs.to(self.store))
            self.extra.append(to_device(extras, self.store, memo={}))
        if run.offload:
            for c in others:
                c.to("cpu")
        # With fp targets, the unquantized model's activations travel beside the quantized ones.
        self.fp_hidden = list(self.hidden) if run.fp_targets else None
        # How each kind of block is quantized (block_structure -> Plan), decided on its first block.
        self.plans: dict[tuple, Plan] = {}
        self.start = self._resume() if run.resume is not None else 0

    def forward(self, i: int, c: int):
        """Block ``i`` on calibration chunk ``c`` of the quantized stream."""
        a, kw = self.extra[c][i]
        return self.layers[i](self.hidden[c].to(self.dev), *to_device(a, self.dev), **to_device(kw, self.dev))

    def outputs(self, i: int) -> list[torch.Tensor]:
        """Block ``i`` run in full on every chunk: the next block's inputs."""
        return [first(self.forward(i, c)).to(self.store) for c in range(len(self.chunks))]

    def plan(self, i: int) -> Plan:
        """How block ``i`` (still unquantized) is quantized: staged where its kind of block passes
        LlamaFlow's probe, else generic in the order its forward calls its linears."""
        block = self.layers[i]
        key = block_structure(block)
        if key not in self.plans:
            forward = lambda: self.forward(i, 0)  # noqa: E731
            if LlamaFlow.probe(block, self.hidden[0].to(self.dev), forward):
                self.plans[key] = Plan(staged=True, groups=None)
            else:
                self.plans[key] = Plan(staged=False, groups=call_order_groups(block, forward, f"model.layers.{i}."))
        return self.plans[key]

    def _resume(self) -> int:
        """Install the finished blocks and take the activations after the last of them."""
        run, layers, resume, n = self.run, self.layers, self.run.resume, len(self.chunks)
        start = resume.done(len(layers))
        for i in range(start):
            block_to(layers[i], run, self.dev)
            entries, tuned = resume.load_block(i, layers[i], self.dev)
            for e in entries:
                run.record(e)
            if tuned:  # the log lists every block's tuning, not only the blocks tuned in this run
                run.log.setdefault("tune", []).extend(tuned)
            block_to(layers[i], run, "cpu")
        if start:
            saved = resume.load_activations(start - 1, n, self.store)
            if saved is not None and (self.fp_hidden is None or f"f.{n - 1}" in saved):
                self.hidden = [saved[f"h.{c}"] for c in range(n)]
                if self.fp_hidden is not None:
                    self.fp_hidden = [saved[f"f.{c}"] for c in range(n)]
            elif self.fp_hidden is not None:  # the fp stream cannot be recomputed from quantized blocks
                raise ValueError(f"quantize_model: resume_dir {str(resume.dir)!r} lacks the saved activations "
                                 f"that fp_targets needs to continue; delete it to restart")
            else:  # recompute them through the finished (quantized) blocks
                for i in range(start):
                    block_to(layers[i], run, self.dev)
                    decoded_cache(layers[i], True)  # the same arithmetic as the first run
                    self.hidden = self.outputs(i)
                    decoded_cache(layers[i], False)
                    block_to(layers[i], run, "cpu")
        return start

    def fp_pass(self, i: int) -> dict[str, list[torch.Tensor]]:
        """Block ``i``, still unquantized, on the fp stream: every linear's inputs per chunk (the
        stream moves past the block). The block stays on the device for :meth:`quantize_block`."""
        block = self.layers[i]
        block_to(block, self.run, self.dev)
        extra = [e[i] for e in self.extra]
        fp_inputs, self.fp_hidden = fp_block_pass(block, self.fp_hidden, extra, self.dev, self.store)
        return fp_inputs

    def quantize_block(self, i: int, fp_inputs: dict[str, list[torch.Tensor]] | None) -> None:
        run, block, prefix = self.run, self.layers[i], f"model.layers.{i}."
        block_to(block, run, self.dev)
        entries_from = len(run.log["layers"])
        plan = self.plan(i)
        forward = lambda c: self.forward(i, c)  # noqa: E731
        after_group = self.tuner(i, entries_from) if run.tune_epochs else (lambda: None)
        if plan.staged:
            self.hidden = staged_block(run, block, prefix, i, self.hidden, forward, fp_inputs, self.store,
                                       after_group)
        else:
            generic_block(run, block, prefix, i, len(self.chunks), forward, fp_inputs, plan.groups, after_group)
            self.hidden = self.outputs(i)
        for e in run.log["layers"][entries_from:]:
            e["path"] = "staged" if plan.staged else "generic"
        decoded_cache(block, False)
        if run.resume is not None:
            run.resume.save_block(i, block, prefix, run.log["layers"][entries_from:],
                                  [t for t in run.log.get("tune", []) if t["block"] == i])
            run.resume.save_activations(i, self.hidden, self.fp_hidden)
        block_to(block, run, "cpu")
        run.write_log()

    def tuner(self, i: int, entries_from: int) -> Callable[[], None]:
        """What runs after each group of block ``i`` (still unquantized) is quantized: its linears not
        yet quantized, those kept in full precision aside, trained toward the block's target
        outputs (tune.tune_pending): the unquantized block's outputs on the fp stream with fp
        targets (:meth:`fp_pass` has moved it past the block), else its outputs on its own inputs
        now. Each group's losses before and after go to the log (``tune``)."""
        run, block, prefix = self.run, self.layers[i], f"model.layers.{i}."
        targets = list(self.fp_hidden) if self.fp_hidden is not None else self.outputs(i)
        names = kept(linears(block), prefix, run.ignore)

        def after_group() -> None:
            done = {e["name"] for e in run.log["layers"][entries_from:]}
            pending = [n for n in names if prefix + n not in done]
            t0 = time.perf_counter()
            losses = tune_pending(block, pending, lambda c: self.forward(i, c), targets, epochs=run.tune_epochs,
                                  lr=run.tune_lr)
            if losses is not None:
                run.log.setdefault("tune", []).append({"block": i, "trained": pending, "loss_before": losses[0],
                                                       "loss_after": losses[1],
                                                       "seconds": time.perf_counter() - t0})

        return after_group


def run_pipeline(run: Run) -> None:
    stream = Stream(run)
    for i in range(stream.start, len(run.layers)):
        stream.quantize_block(i, stream.fp_pass(i) if stream.fp_hidden is not None else None)
