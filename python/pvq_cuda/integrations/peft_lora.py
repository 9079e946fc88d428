"""PEFT: LoRA adapters on PVQ layers. ``get_peft_model(model, LoraConfig(target_modules=[...]))``
wraps each targeted PVQLinear in :class:`PVQLoraLinear`: the frozen PVQ layer plus a trainable
low-rank term. Gradients reach the adapters of earlier layers through the PVQ layers' own
backward (pvq_matmul's input gradient, decoded on the fly).

PEFT finds layer types it does not know through a mapping each LoraConfig carries
(``LoraConfig._register_custom_module``, peft 0.12 and later). ``import pvq_cuda`` arranges that
every LoraConfig made afterwards carries ours, including the ones ``PeftModel.from_pretrained``
rebuilds from a saved adapter (the mapping itself is not saved): see :func:`install`.

Merging an adapter into a PVQ layer is refused: the sum is no longer a point of the pyramid, so it
would need quantizing again (``pvq_cuda.quantize_model`` on the merged dense model).
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ..layers.linear import PVQLinear


class PVQLoraLinear(nn.Module, LoraLayer):
    """LoRA on a PVQLinear: ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` per active adapter."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        if config.use_dora:
            raise ValueError("LoRA on PVQ layers: DoRA is not supported (it needs the dense weight); set use_dora=False")
        super().__init__()
        with warnings.catch_warnings():
            # PEFT warns "Unsupported layer type ... proceed at your own risk" for every layer type
            # outside its own list, then reads in/out_features from it, which PVQLinear has.
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_base_layer_device_and_dtype(self, base_layer):
        # A PVQ layer's weight is packed codes: the adapters live where the codes are, in the
        # layer's float dtype (its bias's, else float32; inputs are cast to it in forward).
        dtype = base_layer.bias.dtype if base_layer.bias is not None else torch.float32
        return base_layer.codes.device, dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for active in self.active_adapters:
            if active not in self.lora_A.keys():
                continue
            lora_A, lora_B = self.lora_A[active], self.lora_B[active]
            out = lora_B(lora_A(self.lora_dropout[active](x.to(lora_A.weight.dtype))))
            result = result + (out * self.scaling[active]).to(result.dtype)
        return result

    def merge(self, *args, **kwargs) -> None:
        raise ValueError("merging a LoRA adapter into a PVQ layer is not possible: the merged weight is no longer "
                         "PVQ-coded and would need quantizing again. Keep the adapter separate, or merge it into the "
                         "unquantized model and run pvq_cuda.quantize_model on the result")

    def unmerge(self) -> None:
        return None  # nothing is ever merged

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _with_pvq_layers(post_init):
    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        if PVQLinear not in (getattr(self, "_custom_modules", None) or {}):
            self._register_custom_module({PVQLinear: PVQLoraLinear})

    __post_init__._pvq_cuda = True
    return __post_init__


def install(peft_module=None) -> None:
    """Make every LoraConfig created from now on map PVQLinear to PVQLoraLinear (idempotent; the
    post-import hook passes the peft module, which is not needed)."""
    if not getattr(LoraConfig.__post_init__, "_pvq_cuda", False):
        LoraConfig.__post_init__ = _with_pvq_layers(LoraConfig.__post_init__)


__all__ = ["PVQLoraLinear", "install"]
