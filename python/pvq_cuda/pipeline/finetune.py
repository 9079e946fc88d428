"""finetune_scales: after coding, train the continuous parameters of a PVQ model toward its
unquantized original, the codes fixed (issue 18.4).

What is trained: each PVQLinear's row scales and gain levels, and the model's normalisation
weights (every module whose class name ends in ``RMSNorm`` or ``LayerNorm``); with ``head`` also
the output head's weight, element by element (the one unquantized matrix whose error reaches the
logits directly; AQLM trains its unquantized parameters too). Each is trained as a multiplicative
factor ``exp(t)``, ``t`` starting at 0, so one learning rate fits parameters of any magnitude and a
row scale never changes sign. The loss is the KL divergence of the quantized model's next-token
distribution from the original's, over the calibration tokens (the teacher runs beside it, no
labels needed).

Two stages, as QuIP# and AQLM fine-tune: first block by block (``block_epochs``), each decoder
block's factors trained so that the block, fed the quantized model's own activations, reproduces
the unquantized block's outputs on the unquantized activations (relative squared error, the
blocks in order, so each stage starts from what the blocks before it now give); then end to end
(``steps``), the KL above.

How: during training each PVQLinear is stood in for by a dense twin (``_ScaledDirections``) that
keeps the layer's decoded directions, ``base[i, g·D:(g+1)·D] = y/‖y‖`` in the rotated basis, and
rebuilds its weight as ``row_scale[i] · levels[gain[i, g]] · base`` with the trainable factors,
so autograd reaches them; the input is rotated as PVQLinear rotates it. That twin costs 4 bytes a
weight (plus its gradient in flight): a training-time cost, fine for the models this runs on a
CPU here. Afterwards the trained values are written back into the packed layers (row scales
rounded to their stored float16) and the twins are removed; the codes are never touched.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from ..format.weight import PVQWeight
from ..layers.decoder import decoder_layers
from ..layers.linear import PVQLinear
from ..ops import dequantize_packed, hadamard_transform
from .capture import block_inputs, first
from .run import progress_bar
from .tune import relative_error

STEP_WINDOWS = 4  # calibration windows per optimizer step (finetune_scales' batch_size)
LEARNING_RATE = 1e-3  # Adam's, on the log-factors: each moves by at most about 0.1 % a step


class _ScaledDirections(nn.Module):
    """A PVQLinear's weight as fixed directions times trainable row scales and gain levels."""

    def __init__(self, layer: PVQLinear) -> None:
        super().__init__()
        w, c = layer.weight, layer.config
        ones_rows = torch.ones_like(w.row_scale)
        ones_levels = torch.ones_like(w.levels)
        base = dequantize_packed(w.codes, ones_rows, ones_levels, w.out_features, w.in_features, c.D, c.K,
                                 c.scale_bits)
        _, gain = w.unpack()
        # Not a submodule: the twin stands in for the layer, and the swap walks submodules.
        object.__setattr__(self, "layer", layer)
        self.D = c.D
        self.register_buffer("base", base)
        self.register_buffer("gain", gain)
        self.register_buffer("row_scale0", w.row_scale.float())
        self.register_buffer("levels0", w.levels.clone())
        self.log_row = nn.Parameter(torch.zeros_like(self.row_scale0))
        self.log_levels = nn.Parameter(torch.zeros_like(self.levels0))
        # The decomposition must reproduce the packed weight, or training would start elsewhere.
        rebuilt = self.weight().detach()
        exact = w.dequantize(rotated=True)
        if not torch.allclose(rebuilt, exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max())):
            raise RuntimeError("finetune_scales: the decoded directions do not rebuild the layer's weight")

    def weight(self) -> torch.Tensor:
        levels = self.levels0 * self.log_levels.exp()
        group = levels[self.gain] * (self.row_scale0 * self.log_row.exp())[:, None]  # [N, groups]
        return self.base * group.repeat_interleave(self.D, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signs = self.layer.signs
        xr = hadamard_transform(x.float(), signs) if signs is not None else x.float()
        bias = None if self.layer.bias is None else self.layer.bias.float()
        return F.linear(xr, self.weight(), bias).to(x.dtype)

    @torch.no_grad()
    def write_back(self) -> None:
        layer = self.layer
        row_scale = (self.row_scale0 * self.log_row.exp()).to(torch.float16)
        levels = self.levels0 * self.log_levels.exp()
        PVQWeight(layer.codes, row_scale, levels, layer.out_features, layer.in_features, layer.config,
                  validate=True)  # what the layer will hold must be a valid packed weight
        layer.row_scale.copy_(row_scale)
        layer.levels.copy_(levels)
        layer.disable_decoded_cache()


def _factor_targets(model: nn.Module, norms: bool,
                    head: bool) -> list[tuple[nn.Parameter, list[tuple[nn.Module, str]]]]:
    """The dense parameters trained as elementwise factors: each norm module's weight (with
    ``norms``: every module whose class name ends in ``RMSNorm`` or ``LayerNorm``) and the output
    head's weight (with ``head``). Each comes with every (module, attribute) that holds it, so a
    head tied to the input embedding is swapped in both places and trains as the one tensor it is."""
    chosen: list[nn.Parameter] = []
    if norms:
        for mod in model.modules():
            name = type(mod).__name__
            w = getattr(mod, "weight", None)
            if (name.endswith("RMSNorm") or name.endswith("LayerNorm")) and isinstance(w, nn.Parameter):
                chosen.append(w)
    if head:
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        w = getattr(out, "weight", None)
        if not isinstance(w, nn.Parameter):
            raise ValueError("finetune_scales: head=True needs a model whose get_output_embeddings() has a weight")
        chosen.append(w)
    sites: dict[int, list[tuple[nn.Module, str]]] = {id(p): [] for p in chosen}
    for mod in model.modules():
        for attr, p in mod._parameters.items():
            if p is not None and id(p) in sites:
                sites[id(p)].append((mod, attr))
    unique = list({id(p): p for p in chosen}.values())
    return [(p, sites[id(p)]) for p in unique]


def _swap(model: nn.Module, old_to_new: dict[int, nn.Module]) -> None:
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if id(child) in old_to_new:
                setattr(parent, name, old_to_new[id(child)])


class _Teacher:
    """The reference model's logits on calibration windows, running its decoder once per window.

    Training cycles over the windows (40 steps of 4 over 28 windows read each about six times), and
    by flops the teacher's forward is one of a step's four forward-sized passes (the student's
    forward, and its backward to the inputs and to the weights are the others). So each window's
    final hidden states are kept (seqlen × hidden floats, 33 MB for SmolLM2's 28 windows) and only
    the output head runs again. That split is used only where it gives the model's own logits bit
    for bit, checked on the first batch: a model that scales or caps its logits after the head
    (Gemma-2's softcapping) is run whole every time instead."""

    def __init__(self, reference: nn.Module, windows: torch.Tensor, device) -> None:
        self.reference, self.windows, self.device = reference, windows, device
        try:
            decoder, head = reference.get_decoder(), reference.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            decoder = head = None
        self.split = (decoder, head) if isinstance(decoder, nn.Module) and isinstance(head, nn.Module) else None
        self.hidden: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def logits(self, rows: list[int]) -> torch.Tensor:
        ids = self.windows[rows].to(self.device)
        if self.split is None:
            return self.reference(input_ids=ids).logits
        decoder, head = self.split
        if not self.hidden:  # the first batch: does the split give the model's logits?
            whole = self.reference(input_ids=ids).logits
            try:
                hidden = decoder(input_ids=ids).last_hidden_state
                split = head(hidden)
            except Exception:  # a decoder that takes or returns something else: run it whole
                split = None
            if split is None or not torch.equal(split, whole):
                self.split = None
                return whole
            self.hidden.update(zip(rows, hidden.unbind(0)))
            return split
        missing = [r for r in dict.fromkeys(rows) if r not in self.hidden]
        if missing:
            self.hidden.update(zip(missing, decoder(input_ids=self.windows[missing].to(self.device))
                                   .last_hidden_state.unbind(0)))
        return head(torch.stack([self.hidden[r] for r in rows]))


@torch.no_grad()
def sample_windows(reference: nn.Module, starts: torch.Tensor, seqlen: int, *, seed: int = 0, batch_size: int = 64,
                   progress: bool = False) -> torch.Tensor:
    """Windows of text written by ``reference`` itself, for fine-tuning toward it: window i starts
    with ``starts[i]`` and continues with tokens sampled from the model's own next-token
    distribution (temperature 1, nothing truncated), ``seqlen`` tokens in all. Its end-of-sequence
    tokens are never drawn, so every window is one stretch of text, as the evaluation windows are.

    Why: a calibration text shows the scales one domain; the model's own samples cover what it puts
    probability on anywhere (LLM-QAT's data-free distillation), and need no text at hand. On the
    default model they taught as much as the Jargon File, no more (README, fine-tuning). Seeded:
    the same ``seed`` gives the same windows.

    Returns int64 ``[len(starts), seqlen]`` on the CPU.
    """
    if not isinstance(starts, torch.Tensor) or starts.dim() != 1 or starts.dtype != torch.long or not len(starts):
        raise ValueError("sample_windows: starts must be a non-empty 1-D int64 tensor of first tokens")
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 2:
        raise ValueError(f"sample_windows: seqlen must be an int >= 2, got {seqlen!r}")
    device = next(reference.parameters()).device
    ends = getattr(getattr(reference, "generation_config", None), "eos_token_id", None)
    ends = [] if ends is None else [ends] if isinstance(ends, int) else list(ends)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(len(starts), seqlen, dtype=torch.long)
    bar = progress_bar(len(starts) * (seqlen - 1), "sampling", unit="tok") if progress else None
    was_training = reference.training
    reference.eval()
    try:
        for b in range(0, len(starts), batch_size):
            ids = starts[b:b + batch_size].to(device)[:, None]
            window, past = [ids], None
            for _ in range(seqlen - 1):
                step = reference(input_ids=ids, past_key_values=past, use_cache=True)
                past = step.past_key_values
                logits = step.logits[:, -1].float()
                if ends:
                    logits[:, ends] = float("-inf")
                ids = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)
                window.append(ids)
                if bar is not None:
                    bar.update(ids.shape[0])
            out[b:b + batch_size] = torch.cat(window, dim=1).cpu()
    finally:
        reference.train(was_training)
        if bar is not None:
            bar.close()
    return out


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) in nats."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _finetune_blocks(model: nn.Module, reference: nn.Module, windows: torch.Tensor, params_of, set_factors, *,
                     epochs: int, lr: float, batch_size: int, device, bar) -> list[tuple[float, float]]:
    """The block-by-block stage: for each decoder block in order, ``epochs`` passes of Adam over
    the windows (``batch_size`` a step) on the relative squared error between the block's output on
    the quantized stream and the unquantized block's output on the unquantized stream; then both
    streams move one block on. ``params_of(block)`` gives the block's trainable log-factors.
    Returns each block's mean loss over its first and its last epoch."""
    q_layers, r_layers = decoder_layers(model, "finetune_scales"), decoder_layers(reference, "finetune_scales")
    if len(q_layers) != len(r_layers):
        raise ValueError(f"finetune_scales: model has {len(q_layers)} decoder blocks and reference "
                         f"{len(r_layers)}: the reference must be the same model unquantized")
    chunks = [windows[i:i + batch_size].to(device) for i in range(0, len(windows), batch_size)]
    with torch.no_grad():
        set_factors()
        caught = [block_inputs(model, q_layers, c) for c in chunks]
        q_in = [h for h, _ in caught]
        extras = [e for _, e in caught]  # each block's other arguments (masks, rotary embeddings) per chunk
        r_in = [block_inputs(reference, r_layers, c)[0] for c in chunks]
    losses = []
    for i, (q_block, r_block) in enumerate(zip(q_layers, r_layers)):

        def run(block: nn.Module, h: torch.Tensor, c: int) -> torch.Tensor:
            args, kwargs = extras[c][i]
            return first(block(h, *args, **kwargs))

        with torch.no_grad():
            targets = [run(r_block, h, c) for c, h in enumerate(r_in)]
        params = params_of(q_block)
        per_epoch = []
        if params:
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(epochs):
                total = 0.0
                for c, h in enumerate(q_in):
                    set_factors()
                    loss = relative_error(run(q_block, h, c), targets[c])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                per_epoch.append(total / len(q_in))
        losses.append((per_epoch[0], per_epoch[-1]) if per_epoch else (float("nan"), float("nan")))
        with torch.no_grad():
            set_factors()
            q_in = [run(q_block, h, c) for c, h in enumerate(q_in)]
        r_in = targets
        if bar is not None:
            bar.set_postfix(block=f"{i + 1}/{len(q_layers)}")
            bar.update()
    return losses


def finetune_scales(model: nn.Module, reference: nn.Module, calibration: torch.Tensor, *, steps: int = 100,
                    lr: float = LEARNING_RATE, batch_size: int = STEP_WINDOWS, norms: bool = True, head: bool = False,
                    held_out: int = 0, block_epochs: int = 0, progress: bool = True) -> dict:
    """Train the row scales and gain levels of ``model``'s PVQ layers (and its norm weights, with
    ``norms``) toward ``reference``, the same model unquantized; the codes stay. In place.

    Args:
        model: a causal LM whose decoder linears are PVQLinear (after :func:`quantize_model`).
        reference: the unquantized model (same architecture), the teacher; not changed.
        calibration: token ids, int64 ``[nsamples, seqlen]``; the last ``held_out`` windows are not
            trained on and give the held-out KL before and after.
        steps: end-to-end optimizer steps (Adam), each on ``batch_size`` windows, cycling through
            them; 0 with ``block_epochs`` for the block stage alone.
        lr: Adam's learning rate on the log-factors (1e-3: about 0.1 % per step at most), both stages.
        block_epochs: passes over the training windows per decoder block in the block-by-block
            stage before the end-to-end one (0: none). Needs a causal LM whose blocks are
            ``model.model.layers``.
        head: also train the output head's weight (``get_output_embeddings()``; with tied
            embeddings the input embedding is the same tensor and changes with it), elementwise, as
            log-factors like the rest, in the end-to-end steps only (a block has no head).

    Returns:
        ``{"steps", "seconds", "trained_parameters", "kl_train_first", "kl_train_last",
        "kl_held_out_before", "kl_held_out_after", "block_epochs", "block_seconds", "block_loss",
        "kl_held_out_after_blocks"}`` (KL in nats per token; held-out ones None without
        ``held_out``; train ones None without ``steps``; ``block_loss``: each block's mean relative
        squared error over its first and last epoch).
    """
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise ValueError("finetune_scales: calibration must be int64 token ids [nsamples, seqlen]")
    if not isinstance(block_epochs, int) or isinstance(block_epochs, bool) or block_epochs < 0:
        raise ValueError(f"finetune_scales: block_epochs must be an int >= 0, got {block_epochs!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < (0 if block_epochs else 1):
        raise ValueError(f"finetune_scales: steps must be a positive int (or 0 with block_epochs), got {steps!r}")
    if not isinstance(head, bool) or (head and not steps):
        raise ValueError(f"finetune_scales: head must be a bool, and True only with steps > 0 (the block stage "
                         f"trains no head), got head={head!r}, steps={steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"finetune_scales: lr must be a positive number, got {lr!r}")
    if not isinstance(held_out, int) or not 0 <= held_out < calibration.shape[0]:
        raise ValueError(f"finetune_scales: held_out must be an int in [0, {calibration.shape[0] - 1}] (windows "
                         f"left for training), got {held_out!r}")
    layers = [m for m in model.modules() if isinstance(m, PVQLinear)]
    if not layers:
        raise ValueError("finetune_scales: model has no PVQLinear layers (quantize it first)")
    if any(m.act_config is not None for m in layers):
        raise ValueError("finetune_scales: layers with coded activations take no gradient; finetune before "
                         "setting act_config")
    t0 = time.perf_counter()
    device = layers[0].codes.device
    n_train = calibration.shape[0] - held_out

    twins = {id(m): _ScaledDirections(m) for m in layers}
    dense = _factor_targets(model, norms, head)  # [(parameter, the (module, attribute) pairs holding it)]
    dense0 = [p.detach().clone() for p, _ in dense]
    dense_logs = [nn.Parameter(torch.zeros_like(w, dtype=torch.float32)) for w in dense0]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    done = False
    _swap(model, twins)
    try:
        for p, _ in frozen:
            p.requires_grad_(False)

        head_weight = model.get_output_embeddings().weight if head else None

        def set_factors(end_to_end: bool = True) -> None:
            for (p, sites), w0, t in zip(dense, dense0, dense_logs):
                if not end_to_end and p is head_weight:
                    # The block stage does not train the head: its parameter, unchanged, stays in
                    # place instead of a rebuilt copy (SmolLM2: 28 M elements, 94 ms a block step here).
                    continue
                value = (w0.float() * t.exp()).to(w0.dtype)  # a tensor for this forward
                for mod, attr in sites:
                    delattr(mod, attr)
                    setattr(mod, attr, value)

        teacher = _Teacher(reference, calibration, device)

        def kl_on(rows: list[int]) -> torch.Tensor:
            target = teacher.logits(rows)
            set_factors()
            return _kl(model(input_ids=calibration[rows].to(device)).logits, target)

        def held_out_kl() -> float | None:
            if not held_out:
                return None
            rows = list(range(n_train, len(calibration)))
            with torch.no_grad():
                return float(sum(kl_on(rows[i:i + batch_size]) * len(rows[i:i + batch_size])
                                 for i in range(0, len(rows), batch_size)) / len(rows))

        bar = None
        if progress:
            bar = progress_bar(steps + (len(decoder_layers(model, "finetune_scales")) if block_epochs else 0),
                               "finetune", unit="step")
        before = held_out_kl()
        block_losses, block_seconds, after_blocks = [], 0.0, None
        if block_epochs:
            log_of = {id(mod): t for (_, sites), t in zip(dense, dense_logs) for mod, _ in sites}

            def params_of(block: nn.Module) -> list[nn.Parameter]:
                mods = list(block.modules())
                return ([p for m in mods if isinstance(m, _ScaledDirections) for p in (m.log_row, m.log_levels)]
                        + [log_of[id(m)] for m in mods if id(m) in log_of])

            tb = time.perf_counter()
            block_losses = _finetune_blocks(model, reference, calibration[:n_train], params_of,
                                            lambda: set_factors(end_to_end=False),
                                            epochs=block_epochs, lr=lr, batch_size=batch_size, device=device, bar=bar)
            block_seconds = time.perf_counter() - tb
            after_blocks = held_out_kl()
        losses = []
        if steps:
            params = [p for t in twins.values() for p in (t.log_row, t.log_levels)] + dense_logs
            opt = torch.optim.Adam(params, lr=lr)
            for step in range(steps):
                start = (step * batch_size) % n_train
                loss = kl_on([(start + k) % n_train for k in range(min(batch_size, n_train))])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if bar is not None:
                    bar.set_postfix(kl=f"{losses[-1]:.4f}")
                    bar.update()
        if bar is not None:
            bar.close()
        after = held_out_kl()
        done = True
    finally:
        # Trained values on success; on any error the model is left exactly as it came.
        _swap(model, {id(t): t.layer for t in twins.values()})
        for (orig, sites), w0, t in zip(dense, dense0, dense_logs):
            for mod, attr in sites:
                if attr not in mod._parameters:  # a plain tensor from the last forward
                    delattr(mod, attr)
                    mod.register_parameter(attr, orig)
            if done:
                orig.data.copy_((w0.float() * t.detach().exp()).to(w0.dtype))
        for p, rg in frozen:
            p.requires_grad_(rg)
    for t in twins.values():
        t.write_back()
    trained = sum(t.log_row.numel() + t.log_levels.numel() for t in twins.values()) + sum(w.numel() for w in dense0)
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "norms": norms, "seconds": time.perf_counter() - t0,
            "trained_parameters": trained, "kl_train_first": losses[0] if losses else None,
            "kl_train_last": losses[-1] if losses else None, "kl_held_out_before": before,
            "kl_held_out_after": after, "block_epochs": block_epochs, "block_seconds": block_seconds,
            "block_loss": block_losses, "kl_held_out_after_blocks": after_blocks}
