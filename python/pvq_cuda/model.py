"""quantize_model / quantize_models: block-by-block (GPTQ-style) quantization of Llama-family causal LMs.

The pipeline (paper.md §6, the order GPTQ uses):

1. Run the calibration tokens through the embeddings and catch the inputs of decoder block 0
   (hidden states plus the keyword arguments the model passes its blocks: position embeddings,
   attention mask, ...), with a forward pre-hook that stops the forward there.
2. For each block, for each sequential group of its linears (q/k/v → o → gate/up → down): make
   the group's inputs on every calibration chunk, with the group's earlier layers already
   quantized, accumulate the group's Hessian from them and quantize each layer of the group.
   Later groups therefore see the already quantized earlier ones. A Llama-style block is run in
   stages (:class:`_LlamaFlow`) so that nothing is computed twice; any other block is run up to
   the group with a :class:`HessianCollector` on it, the forward stopping as soon as every
   layer of the group has seen its input.
3. The finished block's outputs on its inputs are the next block's inputs. Only one block's
   activations (and its intermediate ones) are held at a time.

With ``fp_targets`` the unquantized model runs beside it (one more forward of each block, on its
own stream of activations), and each layer is quantized toward the output the fp model gives,
not the output its unquantized weight gives on the already-perturbed inputs (see
:func:`fp_target_weight`). :func:`quantize_models` runs several copies of one model together,
block by block, and makes that fp pass once for all of them.

Baselines (RTN, GPTQ, rotated GPTQ) run through the same pipeline; see :mod:`pvq_cuda.methods`.
Data-free methods (``pvq-datafree``, ``rtn-*``) need no activations and skip steps 1–3.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_PRESET, PVQConfig
from .hessian import DEFAULT_DAMP, HessianCollector
from .io import load as _load_file
from .io import save as _save_file
from .linear import PVQLinear
from .methods import Method, h_loss, parse_method, quantize_linear, weight_loss
from .quantize import check_refine_passes
from .report import write_json
from .weight import PVQWeight

#: Linears of a Llama-family block in the order GPTQ quantizes them; layers in one group share
#: one input. Linears not named here go last, one group each, in module order.
SEQUENTIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

LOSS_DEFINITION = ("H-weighted relative error tr((W-Wq) H (W-Wq)^T) / tr(W H W^T), H the damped calibration "
                   "Hessian of the layer; data-free methods log the weight error |W-Wq|^2/|W|^2 instead")

RESUME_VERSION = 1


class _Stop(Exception):
    """Raised by our hooks to end a forward pass early (the rest of it is not needed)."""


# ------------------------------------------------------------------------------------------------
# model structure

def decoder_layers(model: nn.Module, fn: str = "quantize_model") -> nn.ModuleList:
    """The decoder blocks ``model.model.layers`` of a causal LM, or a TypeError saying what is wrong."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch nn.Module (a transformers causal LM), got {type(model).__name__}")
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if head is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"{fn}: model must be a Llama-family causal LM (model.model.layers decoder blocks and an "
                        f"lm_head), got {type(model).__name__}; a base model without an LM head or an encoder "
                        f"model cannot be quantized by this pipeline")
    return layers


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


def _groups(block: nn.Module) -> list[list[str]]:
    present = _linears(block)
    groups, seen = [], set()
    for g in SEQUENTIAL_GROUPS:
        names = [n for n in g if n in present]
        if names:
            groups.append(names)
            seen.update(names)
    groups += [[n] for n in present if n not in seen]
    return groups


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _to(obj, device):
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ------------------------------------------------------------------------------------------------
# calibration input

def _calibration_chunks(calibration, batch_size: int, vocab_size: int | None) -> list[torch.Tensor]:
    """Token ids as a list of int64 [b, seqlen] chunks (same-length samples are batched)."""
    if calibration is None:
        raise ValueError("quantize_model: calibration is required for this method (token ids [nsamples, seqlen])")
    if isinstance(calibration, torch.Tensor):
        samples = [calibration] if calibration.dim() == 1 else list(calibration)
        if calibration.dim() not in (1, 2):
            raise ValueError(f"quantize_model: calibration must be token ids [nsamples, seqlen], got shape "
                             f"{list(calibration.shape)}")
    elif isinstance(calibration, Sequence) and not isinstance(calibration, str):
        samples = [s.reshape(-1) if isinstance(s, torch.Tensor) and s.dim() == 2 and s.shape[0] == 1 else s
                   for s in calibration]
    else:
        raise TypeError(f"quantize_model: calibration must be a tensor or a list of tensors of token ids, got "
                        f"{type(calibration).__name__}")
    if not samples:
        raise ValueError("quantize_model: calibration holds no samples")
    for i, s in enumerate(samples):
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() == 0:
            raise ValueError(f"quantize_model: calibration sample {i} must be a non-empty 1-D tensor of token ids")
        if s.dtype.is_floating_point or s.dtype == torch.bool:
            raise TypeError(f"quantize_model: calibration sample {i} must hold integer token ids, got {s.dtype}")
        if int(s.min()) < 0 or (vocab_size is not None and int(s.max()) >= vocab_size):
            raise ValueError(f"quantize_model: calibration sample {i} holds token ids outside [0, {vocab_size})")
    chunks: list[torch.Tensor] = []
    i = 0
    while i < len(samples):  # consecutive samples of one length go into one batch
        j = i + 1
        while j < len(samples) and j - i < batch_size and samples[j].numel() == samples[i].numel():
            j += 1
        chunks.append(torch.stack([s.long() for s in samples[i:j]]))
        i = j
    return chunks


def _calibration_digest(chunks: list[torch.Tensor] | None) -> str | None:
    if chunks is None:
        return None
    h = hashlib.sha256()
    for c in chunks:
        h.update(str(list(c.shape)).encode())
        h.update(c.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# hooks

class _StopWhenSeen:
    """Stops a forward pass once every module in ``modules`` has been called (a pre-hook registered
    after the HessianCollector's, so the collector has already seen the input)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self._ids = {id(m) for m in modules}
        self._pending: set[int] = set()
        self._handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self._pending.discard(id(module))
        if not self._pending:
            raise _Stop

    def reset(self) -> None:
        self._pending = set(self._ids)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _catch_inputs(module: nn.Module, run: Callable[[], object]) -> tuple[tuple, dict]:
    """Call ``run`` and return the (args, kwargs) ``module`` was called with; the forward stops there."""
    caught: list = []

    def hook(mod, args, kwargs):
        caught.append((args, dict(kwargs)))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not caught:
        raise RuntimeError(f"quantize_model: the forward pass never reached {type(module).__name__}")
    return caught[0]


class _ShiftCollector:
    """Accumulates S = Σ (x̃ − x) xᵀ on one linear's inputs x (the quantized model's), with x̃ the
    fp model's input to the same layer for the same chunk. With ``hook=True`` it watches the
    module's inputs (set ``chunk`` before each call); otherwise the caller feeds :meth:`add`."""

    def __init__(self, module: nn.Linear, fp_inputs: list[torch.Tensor], hook: bool = True) -> None:
        self.fp_inputs, self.chunk = fp_inputs, 0
        self.sum: torch.Tensor | None = None
        self._n = module.in_features
        self._handle = (module.register_forward_pre_hook(lambda mod, args: self.add(args[0], self.chunk))
                        if hook else None)

    def add(self, x: torch.Tensor, chunk: int) -> None:
        x = x.detach().reshape(-1, self._n).float()
        dx = self.fp_inputs[chunk].to(x.device).reshape(-1, self._n).float() - x
        if self.sum is None:
            self.sum = torch.zeros(self._n, self._n, dtype=torch.float64, device=x.device)
        # bf16 operands: S only enters as a correction W·S·H⁻¹, and the drift x̃ − x is itself a
        # small fraction of x, so its ~0.4 % rounding is far below the 1 % damping; the product
        # runs 2.2x faster than in fp32 on the dev CPU (AVX512-BF16), and on GPU tensor cores.
        self.sum += (dx.T.to(torch.bfloat16) @ x.to(torch.bfloat16)).double()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class _LlamaFlow:
    """A Llama-style decoder block run in stages, so that each sequential group's inputs are made
    without running any layer whose output is not needed::

        x_attn = input_layernorm(h)              q/k/v inputs: no linear runs
        a      = o_proj's input                  the block's forward, stopped at o_proj
        r      = h + o_proj(a)                   the block's residual add
        x_mlp  = post_attention_layernorm(r)     gate/up inputs: no linear runs
        d      = down_proj's input               mlp(x_mlp), stopped at down_proj
        out    = r + down_proj(d)                the next block's input

    The generic path (the block run up to each group) computes, per token, q/k/v/o and attention
    twice, gate and up twice, and q and k once more: 16.3 against 10.7 units of a q_proj-sized
    GEMM at SmolLM2's shapes, and two attentions against one. :meth:`probe` checks once per run,
    on the unquantized block, that every stage equals the block's own forward bit for bit; a block
    that fails it (another residual layout, extra norms, other linears) takes the generic path."""

    QKV, O, GATE_UP, DOWN = SEQUENTIAL_GROUPS

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    @classmethod
    def probe(cls, block: nn.Module, h: torch.Tensor, forward: Callable[[], object]) -> bool:
        """Whether the stages reproduce ``forward()`` (the block on input ``h``) bit for bit."""
        linears = _linears(block)
        if set(linears) != {n for g in SEQUENTIAL_GROUPS for n in g}:
            return False
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(block, norm, None), nn.Module):
                return False
        seen: dict[str, torch.Tensor] = {}
        handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, args[0]))
                   for n, m in linears.items()]
        try:
            out = _first(forward())
        finally:
            for hd in handles:
                hd.remove()
        if len(seen) != len(linears):  # a linear the forward never calls
            return False
        flow = cls(block)
        try:
            x_attn = flow.attn_input(h)
            r = flow.residual(h, seen["self_attn.o_proj"])
            x_mlp = flow.mlp_input(r)
            return (all(torch.equal(seen[n], x_attn) for n in cls.QKV)
                    and all(torch.equal(seen[n], x_mlp) for n in cls.GATE_UP)
                    and torch.equal(flow.down_input(x_mlp), seen["mlp.down_proj"])
                    and torch.equal(flow.output(r, seen["mlp.down_proj"]), out))
        except (RuntimeError, TypeError, ValueError, AttributeError):  # a stage that does not fit this block
            return False

    def attn_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.block.input_layernorm(h)

    def o_input(self, forward: Callable[[], object]) -> torch.Tensor:
        return _catch_inputs(self.block.self_attn.o_proj, forward)[0][0]

    def residual(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return h + self.block.self_attn.o_proj(a)

    def mlp_input(self, r: torch.Tensor) -> torch.Tensor:
        return self.block.post_attention_layernorm(r)

    def down_input(self, x_mlp: torch.Tensor) -> torch.Tensor:
        return _catch_inputs(self.block.mlp.down_proj, lambda: self.block.mlp(x_mlp))[0][0]

    def output(self, r: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return r + self.block.mlp.down_proj(d)


def _fp_block_pass(block: nn.Module, fp_hidden: list[torch.Tensor], extra, dev, store):
    """Run the still unquantized ``block`` on the fp stream: every linear's input per chunk, and
    the block's outputs (the fp stream's next activations)."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in _linears(block)}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0].detach().to(store)))
               for n, m in _linears(block).items()]
    try:
        out = []
        for c, h in enumerate(fp_hidden):
            a, kw = extra[c]
            out.append(_first(block(h.to(dev), *_to(a, dev), **_to(kw, dev))).to(store))
    finally:
        for hd in handles:
            hd.remove()
    return inputs, out


# ------------------------------------------------------------------------------------------------
# the pipeline

def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="layer", desc=desc, dynamic_ncols=True)


class _Run:
    """State of one quantize_model call."""

    def __init__(self, model, method: Method, config: PVQConfig, overrides, ignore, device, offload, act_order,
                 metric_search, damp, seed, progress, log_path, total_layers, fp_targets=False, refine_passes=0):
        self.model, self.method, self.config = model, method, config
        self.fp_targets = fp_targets
        self.overrides = overrides
        self.ignore = ignore
        self.device, self.offload = device, offload
        self.act_order, self.metric_search, self.damp, self.seed = act_order, metric_search, damp, seed
        self.refine_passes = refine_passes
        self.layers: nn.ModuleList | None = None
        self.chunks: list[torch.Tensor] | None = None  # calibration token ids, one tensor per forward
        self.resume: _Resume | None = None
        self.log_path = log_path
        self.log: dict = {}
        self.total_layers = total_layers
        self.bar = _progress_bar(total_layers, method.name) if progress else None

    def config_for(self, name: str) -> PVQConfig:
        for pattern, cfg in self.overrides:
            if pattern.search(name):
                return cfg
        return self.config

    def record(self, entry: dict) -> None:
        self.log["layers"].append(entry)
        if self.bar is not None:
            self.bar.set_description(f"{self.method.name}: {entry['name']}")
            self.bar.set_postfix(loss=f"{entry['loss']:.4g}")
            self.bar.update(1)

    def write_log(self) -> None:
        if self.log_path is not None:
            write_json(self.log_path, self.log)

    def quantize_layer(self, block: nn.Module, prefix: str, rel: str, H: torch.Tensor | None, seconds_h: float,
                       block_index: int, shift: torch.Tensor | None = None) -> None:
        full = f"{prefix}{rel}"
        linear = block.get_submodule(rel)
        # The baselines overwrite the nn.Linear's weight in place: keep the original for the loss.
        W = linear.weight.detach().clone() if self.method.simulated else linear.weight.detach()
        t0 = time.perf_counter()
        if shift is not None:
            W = fp_target_weight(W, shift, H)
        res = quantize_linear(linear, self.method, self.config_for(full), H, act_order=self.act_order,
                              metric_search=self.metric_search, refine_passes=self.refine_passes, seed=self.seed,
                              weight=W if shift is not None else None)
        seconds = time.perf_counter() - t0
        if res.module is not linear:
            _set_submodule(block, rel, res.module)
        loss = h_loss(W, res.w_hat, H) if H is not None else weight_loss(W, res.w_hat)
        if isinstance(res.module, PVQLinear):
            res.module.enable_decoded_cache()  # the rest of the pipeline runs dense GEMMs on the decoded weight
        self.record({"name": full, "block": block_index, "out_features": linear.out_features,
                     "in_features": linear.in_features, "loss": loss,
                     "loss_kind": "hessian" if H is not None else "weight", "hessian_used": res.hessian_used,
                     "bpw": res.bpw, "seconds": seconds, "hessian_seconds": seconds_h})


    def quantize_group(self, block: nn.Module, prefix: str, block_index: int, names: list[str],
                       hc: HessianCollector, shift: _ShiftCollector | None, seconds_h: float) -> None:
        """Quantize the layers ``names`` of one sequential group with their collected Hessians."""
        for n in names:
            try:
                H = hc.hessian(n)
            except KeyError:
                raise RuntimeError(f"quantize_model: {prefix + n} was never called in the block's forward pass, "
                                   f"so it has no Hessian") from None
            S = None if shift is None else shift.sum * (2.0 / max(hc.tokens(n), 1))
            self.quantize_layer(block, prefix, n, H, seconds_h, block_index, shift=S)

def fp_target_weight(W: torch.Tensor, shift: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """The weight whose outputs on the quantized model's inputs X best match the fp model's W·X̃.

    min_Q ‖W X̃ − Q X‖² is min_Q ‖(W_t − Q) X‖² plus a constant, with the least-squares target
    W_t = W + W·S·H⁻¹, S = (2/N) Σ (x̃ − x) xᵀ and H the damped (2/N) Σ x xᵀ. Written as a
    correction of W it leaves W unchanged when X̃ = X (damping does not shrink it). This is the
    asymmetric calibration of GPTQv2/GPTAQ: error feedback then also undoes the drift that the
    earlier quantized layers left in this layer's inputs.
    """
    Wd = W.double()
    corr = torch.linalg.solve(H.double().to(W.device), (Wd @ shift.double().to(W.device)).T).T  # W S H⁻¹ (H symmetric)
    return (Wd + corr).to(W.dtype)


def _fingerprint(model, method: Method, config, overrides, ignore, act_order, metric_search, fp_targets,
                 refine_passes, damp, seed, calib_digest) -> str:
    # The search options share the key "act_order", each added only where it changed the encoding
    # (fp targets from their first release, refine passes when > 0), so that resume directories
    # written before an option existed keep their fingerprints.
    flags = (act_order, metric_search, True) if fp_targets else (act_order, metric_search)
    if refine_passes:
        flags += (("refine_passes", refine_passes),)
    cfg = model.config.to_dict() if hasattr(model, "config") and hasattr(model.config, "to_dict") else {}
    cfg.pop("quantization_config", None)
    cfg.pop("transformers_version", None)
    spec = {"version": RESUME_VERSION, "method": method.name, "config": config.to_dict(),
            "overrides": [[p.pattern, c.to_dict()] for p, c in overrides], "ignore": ignore,
            "act_order": flags, "damp": damp, "seed": seed, "calibration": calib_digest,
            "model": json.dumps(cfg, sort_keys=True, default=str)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


class _Resume:
    """Per-block checkpoints in ``resume_dir``: ``block_XXXX.safetensors`` (the quantized layers of a
    finished block, written atomically by pvq_cuda.save) and ``activations.safetensors`` (the inputs of
    the next block, so a rerun continues without recomputing the finished blocks)."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        manifest = self.dir / "manifest.json"
        if manifest.exists():
            old = json.loads(manifest.read_text()).get("fingerprint")
            if old != fingerprint:
                raise ValueError(f"quantize_model: resume_dir {str(self.dir)!r} holds a run with other settings "
                                 f"(model, method, config, calibration, ...); use another directory or delete it")
        else:
            write_json(manifest, {"fingerprint": fingerprint, "version": RESUME_VERSION})

    def block_path(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.safetensors"

    def done(self, num_blocks: int) -> int:
        """How many leading blocks are finished."""
        k = 0
        while k < num_blocks and self.block_path(k).exists():
            k += 1
        return k

    def save_block(self, i: int, block: nn.Module, prefix: str, entries: list[dict]) -> None:
        tensors: dict = {}
        for rel, m in block.named_modules():
            if isinstance(m, PVQLinear):
                tensors[rel] = m.weight
                if m.bias is not None:
                    tensors[f"{rel}.bias"] = m.bias
        for e in entries:  # simulated baselines: the dense dequantized weights
            rel = e["name"][len(prefix):]
            m = block.get_submodule(rel)
            if isinstance(m, nn.Linear):
                tensors[f"{rel}.weight"] = m.weight.detach()
        _save_file(self.block_path(i), tensors, metadata={"fingerprint": self.fingerprint,
                                                          "log": json.dumps(entries)})

    def load_block(self, i: int, block: nn.Module, device) -> list[dict]:
        from .io import read_metadata

        path = self.block_path(i)
        meta = read_metadata(path)
        if meta.get("fingerprint") != self.fingerprint:
            raise ValueError(f"quantize_model: {str(path)!r} belongs to another run; delete resume_dir to restart")
        stored = _load_file(path, device=device)
        for name, value in stored.items():
            if isinstance(value, PVQWeight):
                _set_submodule(block, name, PVQLinear.from_weight(value, stored.get(f"{name}.bias")))
        for name, value in stored.items():
            if name.endswith(".weight") and isinstance(value, torch.Tensor):
                with torch.no_grad():
                    block.get_submodule(name[: -len(".weight")]).weight.copy_(value)
        return json.loads(meta["log"])

    def save_activations(self, i: int, hidden: list[torch.Tensor], fp_hidden: list[torch.Tensor] | None) -> None:
        tensors = {f"h.{c}": h for c, h in enumerate(hidden)}
        tensors.update({f"f.{c}": h for c, h in enumerate(fp_hidden or [])})
        _save_file(self.dir / "activations.safetensors", tensors,
                   metadata={"fingerprint": self.fingerprint, "after_block": str(i)})

    def load_activations(self, i: int, n_chunks: int, device) -> dict[str, torch.Tensor] | None:
        """The saved tensors (``h.<chunk>``, and ``f.<chunk>`` with fp targets) after block ``i``."""
        from .io import read_metadata

        path = self.dir / "activations.safetensors"
        if not path.exists():
            return None
        meta = read_metadata(path)
        if meta.get("fingerprint") != self.fingerprint or meta.get("after_block") != str(i):
            return None
        stored = _load_file(path, device=device)
        if any(f"h.{c}" not in stored for c in range(n_chunks)):
            return None
        return stored


def _compile_overrides(overrides) -> list[tuple[re.Pattern, PVQConfig]]:
    out = []
    for pattern, cfg in (overrides or {}).items():
        if isinstance(cfg, str):
            cfg = PVQConfig.preset(cfg)
        if not isinstance(cfg, PVQConfig):
            raise TypeError(f"quantize_model: overrides[{pattern!r}] must be a PVQConfig or a preset name")
        try:
            out.append((re.compile(pattern), cfg))
        except re.error as e:
            raise ValueError(f"quantize_model: overrides key {pattern!r} is not a valid regex: {e}") from e
    return out


def quantize_model(model: nn.Module, calibration=None, config: PVQConfig | str | None = None, *,
                   ignore: str | None = None, device=None, offload: bool = False, act_order: bool = False,
                   resume_dir: str | os.PathLike | None = None, progress: bool = True, method: str = "pvq",
                   overrides: Mapping[str, PVQConfig | str] | None = None, damp: float = DEFAULT_DAMP,
                   batch_size: int = 8, seed: int = 0, log_path: str | os.PathLike | None = None,
                   calibration_info: Mapping | None = None, metric_search: bool = False,
                   fp_targets: bool = False, refine_passes: int = 0) -> dict:
    """Quantize the decoder linears of a Llama-family causal LM in place, block by block.

    Args:
        model: a transformers causal LM with ``model.model.layers`` (Llama, Mistral, Qwen2, SmolLM...).
        calibration: token ids, int64 ``[nsamples, seqlen]`` or a list of 1-D tensors; required by
            the methods that use Hessians (``pvq``, ``gptq-*``), ignored by the data-free ones.
        config: a :class:`PVQConfig` or a preset name (default ``pvq-3.25``), for ``method="pvq"``.
        ignore: regex; linears whose full name matches (``re.search``) stay in full precision.
            Only the decoder blocks are quantized: embeddings and lm_head always stay.
        device: where the work runs (default CUDA when available, else CPU). Without ``offload``
            the whole model moves there.
        offload: keep the model and the activations on CPU and move one block at a time to ``device``.
        act_order: quantize columns in order of decreasing Hessian diagonal (GPTQ's desc_act).
        metric_search: PVQ only: refine each group's pulses under its Hessian block metric
            (``quantize_weight(..., metric_search=True)``; slower, usually better).
        refine_passes: PVQ only: coordinate-descent passes over each layer's groups after error
            feedback (``quantize_weight(..., refine_passes=n)``; lowers the layer loss, costs time).
        fp_targets: quantize each layer toward the unquantized model's outputs (asymmetric
            calibration, :func:`fp_target_weight`); costs one more forward per block and the fp
            model's activations beside the quantized ones. Any method with a Hessian.
        resume_dir: save each finished block there and skip finished blocks on a rerun with the
            same settings (a rerun with other settings raises ValueError).
        progress: show a tqdm bar (layer name, loss, ETA).
        method: ``"pvq"`` (default), ``"pvq-datafree"``, or a baseline such as ``"rtn-int4"``,
            ``"gptq-int3"``, ``"gptq-rot-int3"`` (see :mod:`pvq_cuda.methods`); baselines leave
            dense ``nn.Linear`` layers holding the dequantized weights (simulated quantization).
        overrides: ``{regex: PVQConfig or preset name}``, per-module configs (first match wins).
        damp: Hessian damping λ (λ·mean(diag H) is added to the diagonal).
        batch_size: calibration samples per forward pass.
        seed: seed of the baselines' rotation (PVQ's rotation seed is ``config.seed``).
        log_path: where the JSON log is (re)written after every block.
        calibration_info: JSON-able description of the calibration data, stored in the
            ``quantization_config`` (e.g. ``{"source": ..., "nsamples": ..., "seqlen": ...}``).

    Returns:
        The log: ``{"method", "label", "config", "loss_definition", "device", "layers": [{"name",
        "block", "loss", "loss_kind", "bpw", "seconds", "hessian_seconds", ...}], "seconds", "bpw"}``,
        where ``bpw`` is the parameter-weighted mean over the quantized linears.
    """
    run = _prepare(model, calibration, config, ignore=ignore, device=device, offload=offload, act_order=act_order,
                   resume_dir=resume_dir, progress=progress, method=method, overrides=overrides, damp=damp,
                   batch_size=batch_size, seed=seed, log_path=log_path, calibration_info=calibration_info,
                   metric_search=metric_search, fp_targets=fp_targets, refine_passes=refine_passes)
    _execute([run])
    return run.log


def uses_fp_targets(method: str, fp_targets: bool) -> bool:
    """Whether a run of ``method`` quantizes toward fp targets (only methods with a Hessian do);
    such runs can share the fp model's pass (:func:`quantize_models`)."""
    return bool(fp_targets) and parse_method(method).hessian


#: quantize_models: the options each run may set for itself; the others are shared.
PER_RUN_OPTIONS = frozenset({"method", "config", "overrides", "act_order", "metric_search", "refine_passes",
                             "log_path", "calibration_info"})


def quantize_models(models: Sequence[nn.Module], calibration=None, runs: Sequence[Mapping] | None = None,
                    **options) -> list[dict]:
    """Quantize several copies of one model, each by its own method, with the results of separate
    :func:`quantize_model` calls but less work.

    ``quantize_model(models[k], calibration, **options, **runs[k])`` for every k, except that the
    runs with a Hessian and ``fp_targets`` go block by block together and share the unquantized
    model's pass over each block (one forward per block instead of one per run: ~27 % of a
    pvq-3.25 run on SmolLM2). Each run's log has ``seconds`` = its own work plus the shared pass,
    and ``shared_seconds`` = the shared pass.

    Args:
        models: the copies (distinct objects, identical weights: checked block by block).
        calibration: token ids, as for :func:`quantize_model`, shared by all runs.
        runs: one mapping per model of the options in :data:`PER_RUN_OPTIONS` (``method``,
            ``config``, ``overrides``, ``act_order``, ``metric_search``, ``refine_passes``,
            ``log_path``, ``calibration_info``).
        **options: any other :func:`quantize_model` keyword argument, shared by all runs;
            ``resume_dir`` is not taken (resume single runs with :func:`quantize_model`).

    Returns:
        The runs' logs, in the order of ``models``.
    """
    models = list(models)
    runs = [dict(r) for r in (runs if runs is not None else [{}] * len(models))]
    if len(runs) != len(models):
        raise ValueError(f"quantize_models: runs must hold one mapping per model ({len(models)}), got {len(runs)}")
    if len({id(m) for m in models}) != len(models):
        raise ValueError("quantize_models: models must be distinct objects (copies, e.g. copy.deepcopy)")
    if "resume_dir" in options:
        raise TypeError("quantize_models: resume_dir is not supported; resume single runs with quantize_model")
    for k, r in enumerate(runs):
        bad = sorted(set(r) - PER_RUN_OPTIONS)
        if bad:
            raise TypeError(f"quantize_models: runs[{k}] sets {bad}, which all runs share; pass them as keyword "
                            f"arguments (per-run options: {sorted(PER_RUN_OPTIONS)})")
    defaults = {n: p.default for n, p in inspect.signature(quantize_model).parameters.items()
                if n not in ("model", "calibration")}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(f"quantize_models: unexpected keyword arguments {unknown}")
    prepared = []
    for model, r in zip(models, runs):
        kw = {**defaults, **options, **r}
        prepared.append(_prepare(model, calibration, kw.pop("config"), **dict(kw, progress=False)))
    if options.get("progress", True):  # one bar for all runs (several would interleave their lines)
        bar = _progress_bar(sum(run.total_layers for run in prepared), f"{len(prepared)} runs")
        for run in prepared:
            run.bar = bar
    _execute(prepared)
    return [run.log for run in prepared]


def _prepare(model: nn.Module, calibration, config, *, ignore, device, offload, act_order, resume_dir, progress,
             method, overrides, damp, batch_size, seed, log_path, calibration_info, metric_search, fp_targets,
             refine_passes) -> _Run:
    """Check quantize_model's arguments and set up its run (nothing is quantized yet)."""
    layers = decoder_layers(model)
    m = parse_method(method)
    if config is None:
        config = PVQConfig.preset(DEFAULT_PRESET)
    elif isinstance(config, str):
        config = PVQConfig.preset(config)
    elif not isinstance(config, PVQConfig):
        raise TypeError(f"quantize_model: config must be a PVQConfig or a preset name, got {type(config).__name__}")
    if ignore is not None:
        try:
            ignore_re = re.compile(ignore)
        except re.error as e:
            raise ValueError(f"quantize_model: ignore {ignore!r} is not a valid regex: {e}") from e
    else:
        ignore_re = None
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"quantize_model: batch_size must be a positive int, got {batch_size!r}")
    if not damp >= 0:
        raise ValueError(f"quantize_model: damp must be >= 0, got {damp!r}")
    check_refine_passes(refine_passes, "quantize_model")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides_c = _compile_overrides(overrides)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    chunks = _calibration_chunks(calibration, batch_size, vocab) if m.hessian else None

    prefix_of = {id(b): f"model.layers.{i}." for i, b in enumerate(layers)}
    todo = [f"{prefix_of[id(b)]}{rel}" for b in layers for rel in _linears(b)]
    todo = [n for n in todo if ignore_re is None or not ignore_re.search(n)]
    if not todo:
        raise ValueError("quantize_model: no linear layer is left to quantize (ignore matches all of them)")

    model.eval()
    if not offload:
        model.to(dev)
    refine_passes = refine_passes if m.kind == "pvq" and m.hessian else 0
    run = _Run(model, m, config, overrides_c, ignore_re, dev, offload, act_order, metric_search, damp, seed, progress,
               log_path, len(todo), fp_targets=uses_fp_targets(method, fp_targets), refine_passes=refine_passes)
    run.layers, run.chunks = layers, chunks
    run.log = {"method": m.name, "label": m.label, "config": config.to_dict() if m.kind == "pvq" else None,
               "overrides": {p.pattern: c.to_dict() for p, c in overrides_c}, "ignore": ignore,
               "act_order": act_order, "metric_search": metric_search, "refine_passes": refine_passes,
               "fp_targets": run.fp_targets,
               "damp": damp if m.hessian else None, "device": str(dev), "offload": offload,
               "loss_definition": LOSS_DEFINITION, "calibration": dict(calibration_info or {}),
               "layers": [], "seconds": None, "bpw": None}
    if chunks is not None:
        run.log["calibration"].update(nsamples=sum(c.shape[0] for c in chunks),
                                      tokens=sum(c.numel() for c in chunks))
    if resume_dir is not None:
        run.resume = _Resume(resume_dir, _fingerprint(model, m, config, overrides_c, ignore, act_order, metric_search,
                                                      run.fp_targets, refine_passes, damp, seed,
                                                      _calibration_digest(chunks)))
    return run


def _execute(runs: list[_Run]) -> None:
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
                        _pipeline(run)
                    else:
                        _data_free(run)
            finally:
                _decoded_cache(run.model, False)
            _finish(run, time.perf_counter() - t_start)
        if together:
            _lockstep(together)
    finally:
        for bar in {id(r.bar): r.bar for r in runs if r.bar is not None}.values():
            bar.close()


def _lockstep(runs: list[_Run]) -> None:
    """Runs on copies of one model, block by block: the fp model's pass over each block is made
    once, by the first run's still unquantized copy, and shared. Each run's ``seconds`` is its own
    work plus the whole shared pass (what it would take alone); ``shared_seconds`` is that pass."""
    own, shared = [0.0] * len(runs), 0.0
    try:
        with torch.no_grad():
            streams = []
            for k, run in enumerate(runs):
                t = time.perf_counter()
                streams.append(_Stream(run))
                own[k] += time.perf_counter() - t
            lead = streams[0]
            for s in streams[1:]:
                s.fp_hidden = None  # only the lead carries the fp stream
            for i in range(len(lead.layers)):
                t = time.perf_counter()
                _check_copies(i, [s.layers[i] for s in streams])
                fp_inputs = lead.fp_pass(i)
                shared += time.perf_counter() - t
                for k, s in enumerate(streams):
                    t = time.perf_counter()
                    s.quantize_block(i, fp_inputs)
                    own[k] += time.perf_counter() - t
                del fp_inputs
    finally:
        for run in runs:
            _decoded_cache(run.model, False)
    for k, run in enumerate(runs):
        run.log["shared_seconds"] = shared
        _finish(run, own[k] + shared)


def _check_copies(i: int, blocks: list[nn.Module]) -> None:
    """The fp pass of block ``i`` is made on the first model's copy: every copy must be the same."""
    ref = list(blocks[0].state_dict().values())
    for k, b in enumerate(blocks[1:], 1):
        other = list(b.state_dict().values())
        if len(other) != len(ref) or not all(torch.equal(x, y.to(x.device)) for x, y in zip(ref, other)):
            raise ValueError(f"quantize_models: models[{k}] is not a copy of models[0] (block {i} differs)")


def _finish(run: _Run, seconds: float) -> None:
    """The log's totals, and the PVQ model's quantization_config."""
    m = run.method
    run.log["seconds"] = seconds
    params = sum(e["out_features"] * e["in_features"] for e in run.log["layers"])
    run.log["bpw"] = sum(e["bpw"] * e["out_features"] * e["in_features"] for e in run.log["layers"]) / params
    run.write_log()
    if m.kind == "pvq":
        from .checkpoint import build_quantization_config

        calib = (dict(run.log["calibration"], metric_search=run.metric_search, refine_passes=run.refine_passes,
                      fp_targets=run.fp_targets) if m.hessian else None)
        run.model.config.quantization_config = build_quantization_config(
            run.model, calibration=calib, damp=run.log["damp"], act_order=run.act_order, method=m.name)


def _decoded_cache(block: nn.Module, on: bool) -> None:
    """Within the pipeline, quantized layers run as dense GEMMs on their decoded weights (the
    fused kernel is meant for small batches); the caches go once a block is finished."""
    for mod in block.modules():
        if isinstance(mod, PVQLinear):
            mod.enable_decoded_cache() if on else mod.disable_decoded_cache()


def _block_to(block: nn.Module, run: _Run, where) -> None:
    if run.offload:
        block.to(where)


def _data_free(run: _Run) -> None:
    ignore_re, resume = run.ignore, run.resume
    for i, block in enumerate(run.layers):
        prefix = f"model.layers.{i}."
        if resume is not None and resume.block_path(i).exists():
            _block_to(block, run, run.device)
            for e in resume.load_block(i, block, run.device):
                run.record(e)
            _block_to(block, run, "cpu")
            continue
        _block_to(block, run, run.device)
        entries_from = len(run.log["layers"])
        for rel, lin in _linears(block).items():
            if ignore_re is not None and ignore_re.search(prefix + rel):
                continue
            run.quantize_layer(block, prefix, rel, None, 0.0, i)
        _decoded_cache(block, False)
        if resume is not None:
            resume.save_block(i, block, prefix, run.log["layers"][entries_from:])
        _block_to(block, run, "cpu")
        run.write_log()


class _Stream:
    """One run's calibration activations, carried through its model block by block (steps 1-3 of
    the module docstring). :meth:`fp_pass` runs the unquantized block on the fp model's stream
    (fp targets); :meth:`quantize_block` quantizes a block and moves the stream past it. Several
    runs on copies of one model can share one fp stream (:func:`quantize_models`)."""

    def __init__(self, run: _Run) -> None:
        self.run, self.layers, self.chunks = run, run.layers, run.chunks
        model, dev, layers = run.model, run.device, run.layers
        self.dev = dev
        self.store = torch.device("cpu") if run.offload else dev  # where activations wait between forwards

        # 1. inputs of block 0. With offload, the small non-block modules (embeddings, rotary
        # embedding, final norm) visit the device for this step only.
        others = [c for n, c in model.model.named_children() if n != "layers"]
        if run.offload:
            for c in others:
                c.to(dev)
        self.hidden, self.extra = [], []
        for ids in self.chunks:
            args, kwargs = _catch_inputs(layers[0], lambda: model(input_ids=ids.to(dev), use_cache=False))
            hs = args[0] if args else kwargs.pop("hidden_states")
            self.hidden.append(hs.to(self.store))
            self.extra.append((_to(tuple(args[1:]), self.store), _to(kwargs, self.store)))
        if run.offload:
            for c in others:
                c.to("cpu")
        # With fp targets, the unquantized model's activations travel beside the quantized ones.
        self.fp_hidden = list(self.hidden) if run.fp_targets else None
        self.staged: bool | None = None  # blocks run as a _LlamaFlow? Probed on the first block quantized
        self.start = self._resume() if run.resume is not None else 0

    def forward(self, block: nn.Module, c: int):
        a, kw = self.extra[c]
        return block(self.hidden[c].to(self.dev), *_to(a, self.dev), **_to(kw, self.dev))

    def outputs(self, block: nn.Module) -> list[torch.Tensor]:
        """The block run in full on every chunk: the next block's inputs."""
        return [_first(self.forward(block, c)).to(self.store) for c in range(len(self.chunks))]

    def _resume(self) -> int:
        """Install the finished blocks and take the activations after the last of them."""
        run, layers, resume, n = self.run, self.layers, self.run.resume, len(self.chunks)
        start = resume.done(len(layers))
        for i in range(start):
            _block_to(layers[i], run, self.dev)
            for e in resume.load_block(i, layers[i], self.dev):
                run.record(e)
            _block_to(layers[i], run, "cpu")
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
                    _block_to(layers[i], run, self.dev)
                    _decoded_cache(layers[i], True)  # the same arithmetic as the first run
                    self.hidden = self.outputs(layers[i])
                    _decoded_cache(layers[i], False)
                    _block_to(layers[i], run, "cpu")
        return start

    def fp_pass(self, i: int) -> dict[str, list[torch.Tensor]]:
        """Block ``i``, still unquantized, on the fp stream: every linear's inputs per chunk (the
        stream moves past the block). The block stays on the device for :meth:`quantize_block`."""
        block = self.layers[i]
        _block_to(block, self.run, self.dev)
        fp_inputs, self.fp_hidden = _fp_block_pass(block, self.fp_hidden, self.extra, self.dev, self.store)
        return fp_inputs

    def quantize_block(self, i: int, fp_inputs: dict[str, list[torch.Tensor]] | None) -> None:
        run, block, prefix = self.run, self.layers[i], f"model.layers.{i}."
        _block_to(block, run, self.dev)
        entries_from = len(run.log["layers"])
        if self.staged is None:
            self.staged = _LlamaFlow.probe(block, self.hidden[0].to(self.dev), lambda: self.forward(block, 0))
        if self.staged:
            self.hidden = _staged_block(run, block, prefix, i, self.hidden, self.forward, fp_inputs, self.store)
        else:
            _generic_block(run, block, prefix, i, len(self.chunks), self.forward, fp_inputs)
            self.hidden = self.outputs(block)
        _decoded_cache(block, False)
        if run.resume is not None:
            run.resume.save_block(i, block, prefix, run.log["layers"][entries_from:])
            run.resume.save_activations(i, self.hidden, self.fp_hidden)
        _block_to(block, run, "cpu")
        run.write_log()


def _pipeline(run: _Run) -> None:
    stream = _Stream(run)
    for i in range(stream.start, len(run.layers)):
        stream.quantize_block(i, stream.fp_pass(i) if stream.fp_hidden is not None else None)


def _kept(names, prefix: str, ignore_re) -> list[str]:
    return [n for n in names if ignore_re is None or not ignore_re.search(prefix + n)]


def _staged_block(run: _Run, block: nn.Module, prefix: str, i: int, hidden: list[torch.Tensor], block_forward,
                  fp_inputs, store) -> list[torch.Tensor]:
    """Quantize a block that passed :meth:`_LlamaFlow.probe`, group by group; returns its outputs."""
    flow, dev = _LlamaFlow(block), run.device

    def quantize(group, inputs: list[torch.Tensor], t0: float) -> None:
        names = _kept(group, prefix, run.ignore)
        if not names:
            return
        mods = {n: block.get_submodule(n) for n in names}
        hc = HessianCollector(mods, run.damp, hooks=False)
        shift = _ShiftCollector(mods[names[0]], fp_inputs[names[0]], hook=False) if fp_inputs is not None else None
        for c, x in enumerate(inputs):
            x = x.to(dev)
            hc.new_batch()
            for n in names:  # one tensor: the group shares one Hessian
                hc.add(n, x)
            if shift is not None:
                shift.add(x, c)
        run.quantize_group(block, prefix, i, names, hc, shift, (time.perf_counter() - t0) / len(names))

    chunks = range(len(hidden))
    t0 = time.perf_counter()
    quantize(_LlamaFlow.QKV, [flow.attn_input(hidden[c].to(dev)) for c in chunks], t0)
    t0 = time.perf_counter()
    a = [flow.o_input(lambda c=c: block_forward(block, c)).to(store) for c in chunks]
    quantize(_LlamaFlow.O, a, t0)
    r = [flow.residual(hidden[c].to(dev), a[c].to(dev)).to(store) for c in chunks]
    del a
    t0 = time.perf_counter()
    x_mlp = [flow.mlp_input(r[c].to(dev)).to(store) for c in chunks]
    quantize(_LlamaFlow.GATE_UP, x_mlp, t0)
    t0 = time.perf_counter()
    d = [flow.down_input(x_mlp[c].to(dev)).to(store) for c in chunks]
    del x_mlp
    quantize(_LlamaFlow.DOWN, d, t0)
    return [flow.output(r[c].to(dev), d[c].to(dev)).to(store) for c in chunks]


def _generic_block(run: _Run, block: nn.Module, prefix: str, i: int, n_chunks: int, block_forward,
                   fp_inputs) -> None:
    """Quantize any block group by group, running it up to each group on every chunk."""
    mlp_in: list | None = None
    for group in _groups(block):
        names = _kept(group, prefix, run.ignore)
        if not names:
            continue
        mods = {n: block.get_submodule(n) for n in names}
        in_mlp = all(n.startswith("mlp.") for n in names) and hasattr(block, "mlp")
        t0 = time.perf_counter()
        if in_mlp and mlp_in is None:  # the MLP's inputs, with the attention already quantized
            mlp_in = [_catch_inputs(block.mlp, lambda c=c: block_forward(block, c)) for c in range(n_chunks)]
        hc = HessianCollector(mods, run.damp)
        shift = _ShiftCollector(mods[names[0]], fp_inputs[names[0]]) if fp_inputs is not None else None
        stopper = _StopWhenSeen(list(mods.values()))
        try:
            for c in range(n_chunks):
                hc.new_batch()
                stopper.reset()
                if shift is not None:
                    shift.chunk = c
                try:
                    if in_mlp:
                        a, kw = mlp_in[c]
                        block.mlp(*a, **kw)
                    else:
                        block_forward(block, c)
                except _Stop:
                    pass
        finally:
            stopper.remove()
            hc.remove()
            if shift is not None:
                shift.remove()
        run.quantize_group(block, prefix, i, names, hc, shift, (time.perf_counter() - t0) / len(names))
