"""PVQLinear: a drop-in replacement for nn.Linear whose weight is a packed PVQWeight."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import nn

from ..format.activation import (ActivationCodes, ActivationConfig, activation_levels, as_activation_config,
                                 check_activation_shape, code_activations, is_input_norm, wa_matmul)
from ..format.config import DEFAULT_PRESET, PVQConfig
from ..format.weight import LAYOUT_VERSION, TILE_ROWS, PVQWeight, pvq_matmul, rotation_signs

# PVQLinear.from_linear quantizes, which is the quantization layer's job (one layer up): that layer
# registers its data-free quantizer here when it is imported (importing pvq_cuda always does), so
# this layer never imports it.
_weight_quantizer: Callable[..., PVQWeight] | None = None

# The last input a W+A layer coded, per thread: q/k/v (and gate/up) of a decoder block take one
# tensor and share the rotation (same seed and size), so the codes are made once for all of them.
_last_codes = threading.local()


def register_weight_quantizer(quantize: Callable[..., PVQWeight]) -> None:
    """Set the function ``quantize(weight, config) -> PVQWeight`` behind :meth:`PVQLinear.from_linear`."""
    global _weight_quantizer
    _weight_quantizer = quantize


class PVQLinear(nn.Module):
    """``y = x W^T + b`` with W stored as PVQ codes and decoded inside the matmul kernel.

    Buffers (all in ``state_dict``): ``codes`` (int32), ``row_scale`` (float16), ``levels``
    (float32) and ``bias`` (if any); the config and format version travel as extra state, so a
    state dict loads into a PVQLinear built with the same shape and config.

    Decoded-weight cache (opt-in, for CPU prefill): ``enable_decoded_cache()`` keeps a dense copy
    of the weight and runs ``F.linear`` on it, trading memory (4 bytes a weight) for speed on large
    batches; ``disable_decoded_cache()`` drops it.

    Weights and activations (W+A, paper.md §7): with an ``act_config``
    (:class:`~pvq_cuda.ActivationConfig`, a preset name, or :meth:`set_activation_config`) every
    input token is PVQ-coded online in the weight's rotated basis (``encode_activations``) and the
    output is the W+A product of the two codes (``wa_matmul``: integer pulse dot products times gain
    products). With the decoded cache on, the same product runs as a dense fp32 matmul of the two
    dequantized operands (the rotated weight is cached). Inference only: no gradient flows
    through coded activations.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, config: PVQConfig | None = None,
                 device=None, dtype: torch.dtype | None = None,
                 act_config: ActivationConfig | str | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else PVQConfig.preset(DEFAULT_PRESET)
        if in_features % self.config.D:
            raise ValueError(f"PVQLinear: in_features ({in_features}) must be a multiple of D={self.config.D}")
        self.in_features, self.out_features = in_features, out_features
        tiles = -(-out_features // TILE_ROWS)
        words = tiles * (in_features // self.config.D) * self.config.code_bits
        self.register_buffer("codes", torch.zeros(words, dtype=torch.int32, device=device))
        self.register_buffer("row_scale", torch.zeros(out_features, dtype=torch.float16, device=device))
        self.register_buffer("levels", torch.zeros(1 << self.config.scale_bits, dtype=torch.float32, device=device))
        # Derived from the config's seed, so not saved; a buffer so that it moves with the module and
        # forward never rebuilds it (which torch.compile could not trace).
        signs = rotation_signs(in_features, self.config.seed) if self.config.rotate else None
        self.register_buffer("signs", None if signs is None else signs.to(device), persistent=False)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.bias = None
        self._decoded: torch.Tensor | None = None
        # The median norm of this layer's input tokens on the calibration data (None: quantized
        # without calibration); coded activations give tokens far above it a second stage
        # (ActivationConfig.outlier_ratio). Saved in the checkpoint's quantization_config.
        self.input_norm: float | None = None
        self.act_config: ActivationConfig | None = None
        self.register_buffer("act_levels", None, persistent=False)  # derived from act_config, like signs
        self.set_activation_config(act_config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: PVQConfig | None = None,
                    act_config: ActivationConfig | str | None = None) -> "PVQLinear":
        """Quantize an nn.Linear (data-free) into a PVQLinear on the same device (with ``act_config``:
        coding its input activations too)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"PVQLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if _weight_quantizer is None:
            raise RuntimeError("PVQLinear.from_linear: no weight quantizer is registered (import pvq_cuda, which "
                               "registers pvq_cuda.quantization's)")
        weight = _weight_quantizer(linear.weight.detach(), config)
        return cls.from_weight(weight, None if linear.bias is None else linear.bias.detach(), act_config=act_config)

    @classmethod
    def from_weight(cls, weight: PVQWeight, bias: torch.Tensor | None = None,
                    act_config: ActivationConfig | str | None = None, input_norm: float | None = None) -> "PVQLinear":
        layer = cls(weight.in_features, weight.out_features, bias is not None, weight.config, device=weight.device,
                    dtype=None if bias is None else bias.dtype, act_config=act_config)
        layer.codes.copy_(weight.codes)
        layer.row_scale.copy_(weight.row_scale)
        layer.levels.copy_(weight.levels)
        if bias is not None:
            layer.bias.copy_(bias)
        layer.set_input_norm(input_norm)
        return layer

    def set_input_norm(self, input_norm: float | None) -> None:
        """Set the calibration median token norm of this layer's inputs (None: unknown)."""
        if input_norm is not None:
            if not is_input_norm(input_norm):
                raise ValueError(f"PVQLinear.set_input_norm: input_norm must be None or a positive finite number, "
                                 f"got {input_norm!r}")
            input_norm = float(input_norm)
        self.input_norm = input_norm

    @property
    def weight(self) -> PVQWeight:
        """A PVQWeight view of the buffers (no copy)."""
        return PVQWeight(self.codes, self.row_scale, self.levels, self.out_features, self.in_features, self.config,
                         validate=False, signs=self.signs)

    def set_activation_config(self, act_config: ActivationConfig | str | None) -> None:
        """Code this layer's input activations with ``act_config`` (a config or preset name), or stop
        coding them (None). The activations are coded in the weight's rotated basis, so the weight
        must be rotated (``config.rotate``)."""
        cfg = as_activation_config(act_config, "PVQLinear.set_activation_config")
        if cfg is not None:
            check_activation_shape(cfg, self.in_features, "PVQLinear.set_activation_config")
            if not self.config.rotate:
                raise ValueError("PVQLinear.set_activation_config: activations are coded in the weight's rotated "
                                 "basis, but this layer's weight is not rotated (config.rotate=False); quantize it "
                                 "with rotate=True")
        self.act_config = cfg
        self.reset_activation_stats()
        if cfg is None:
            self.act_levels = None
        else:
            device = self.codes.device if self.codes.device.type != "meta" else "cpu"
            self.act_levels = activation_levels(cfg, self.in_features).to(device)
        self._decoded = None  # the cache holds the rotated weight exactly when activations are coded

    def reset_activation_stats(self) -> None:
        """Zero the counts behind :meth:`activation_bits` (tokens coded, tokens given a second stage)."""
        self.act_tokens = 0
        self.act_outliers = 0

    def activation_bits(self) -> float | None:
        """Bits per activation this layer's coded inputs have cost since the last reset: one stage
        per token, a second on the flagged ones (None before any token)."""
        if self.act_config is None or not self.act_tokens:
            return None
        return self.act_config.bits_per_activation(self.in_features, self.act_outliers / self.act_tokens)

    def code_input(self, x: torch.Tensor) -> ActivationCodes:
        """The activation codes of ``x [..., in_features]`` (needs an act_config)."""
        if self.act_config is None:
            raise ValueError("PVQLinear.code_input: this layer has no act_config (set_activation_config)")
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"PVQLinear (W+A): x must have shape [..., in_features={self.in_features}], got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        key = None
        if not torch.compiler.is_compiling() and not x.is_inference():  # inference tensors have no version
            key = (self.act_config, self.config.seed, self.input_norm, x._version)
            last = getattr(_last_codes, "entry", None)
            if last is not None and last[0] is x and last[1] == key:
                self._count(last[2])
                return last[2]
        levels = self.act_levels if self.act_levels.device == x.device else self.act_levels.to(x.device)
        codes = code_activations(x.detach(), self.act_config, self.signs, levels, self.input_norm)
        self._count(codes)
        # Holding x keeps any other tensor from taking its identity; an in-place change bumps its version.
        _last_codes.entry = None if key is None else (x, key, codes)
        return codes

    def _count(self, codes: ActivationCodes) -> None:
        if not torch.compiler.is_compiling():
            self.act_tokens += codes.tokens
            self.act_outliers += codes.outlier_count

    def _forward_wa(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("PVQLinear: coded activations (act_config) are for inference: no gradient flows through "
                               "them; run under torch.no_grad(), or set_activation_config(None) to train")
        codes = self.code_input(x)
        if self._decoded is not None:
            bias = None if self.bias is None else self.bias.float()
            out = nn.functional.linear(codes.dequantize(), self._decoded, bias)
        else:
            out = wa_matmul(codes, self.weight, self.bias)
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_config is not None:
            return self._forward_wa(x)
        if self._decoded is not None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self._decoded.to(x.dtype), bias)
        return pvq_matmul(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must move the packed buffers, never convert them: their dtypes are the
        # format (an fp16 scale cast to bf16 would lose bits).
        packed = {name: self._buffers[name] for name in ("codes", "row_scale", "levels", "signs", "act_levels")
                  if self._buffers[name] is not None}
        super()._apply(fn, recurse)
        for name, old in packed.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def restore_signs(self) -> None:
        """Recompute the rotation-signs buffer from the config's seed (and the activation levels
        from the act_config), on the codes' device. They are derived state, not saved; a loader that
        allocates non-persistent buffers without filling them (transformers' from_pretrained does)
        calls this afterwards."""
        device = self.codes.device if self.codes.device.type != "meta" else "cpu"
        if self.config.rotate:
            self.signs = rotation_signs(self.in_features, self.config.seed).to(device)
        if self.act_config is not None:
            self.act_levels = activation_levels(self.act_config, self.in_features).to(device)

    def enable_decoded_cache(self) -> None:
        # With coded activations the product runs in the rotated basis: cache the rotated weight.
        self._decoded = self.weight.dequantize(rotated=self.act_config is not None)

    def disable_decoded_cache(self) -> None:
        self._decoded = None

    # The config is part of the layer's state: a state dict from another config must not load.
    def get_extra_state(self) -> dict:
        state = {"format_version": LAYOUT_VERSION, "config": self.config.to_dict()}
        if self.act_config is not None:
            state["act_config"] = self.act_config.to_dict()
        if self.input_norm is not None:
            state["input_norm"] = self.input_norm
        return state

    def set_extra_state(self, state: dict) -> None:
        if state.get("format_version") != LAYOUT_VERSION:
            raise ValueError(f"PVQLinear: state has format_version {state.get('format_version')!r}, this "
                             f"pvq_cuda reads {LAYOUT_VERSION}")
        config = PVQConfig(**state["config"])
        if config != self.config:
            raise ValueError(f"PVQLinear: state was saved with {config}, this layer has {self.config}")
        act = state.get("act_config")
        self.set_activation_config(None if act is None else ActivationConfig(**act))  # the state's, or none
        self.set_input_norm(state.get("input_norm"))
        self._decoded = None

    def extra_repr(self) -> str:
        c = self.config
        a = self.act_config
        act = "" if a is None else f", act: D={a.D}, K={a.K}, gain_bits={a.gain_bits}, outlier_ratio={a.outlier_ratio}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"D={c.D}, K={c.K}, scale_bits={c.scale_bits}, rotate={c.rotate}{act}")
