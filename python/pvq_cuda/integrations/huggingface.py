"""transformers: ``AutoModelForCausalLM.from_pretrained(dir)`` on a directory written by
:func:`pvq_cuda.save_quantized` (or by ``save_pretrained`` of such a model).

``import pvq_cuda`` registers the quantization method ``"pvq"`` with transformers (4.50 and later):
:class:`PVQQuantizationConfig` reads the ``quantization_config`` of ``config.json`` and
:class:`PVQHfQuantizer` puts PVQ layers in place of the model's ``nn.Linear`` modules on the meta
device before the weights load, the way transformers' AQLM and VPTQ quantizers do. The tensors
then load by name: a PVQ layer ``name`` is stored as ``name.codes``, ``name.row_scale``,
``name.levels`` (and ``name.bias``), exactly its buffers. Nothing is quantized while loading:
``pvq`` checkpoints are made by :func:`pvq_cuda.quantize_model`.

Without ``import pvq_cuda``, transformers logs "Unknown quantization type ... pvq" and would build
a dense model whose linears have no weights in the files. So every checkpoint also holds an empty
placeholder under the first PVQ layer's ``weight`` name (:func:`placeholder_key`): a dense load
finds a tensor of the wrong size there and raises (transformers refuses mismatched sizes unless
told otherwise), while the PVQ model, which has no such parameter, ignores it.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..format.checkpoint import (QUANT_METHOD, act_config_of, check_quantization_config, config_of, input_norm_of,
                                 placeholder_key)
from ..layers.decoder import set_submodule
from ..layers.linear import PVQLinear
from ..layers.quantized_model import make_save_pretrained_atomic


class PVQQuantizationConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a pvq_cuda checkpoint (its keys: pvq_cuda.format.checkpoint),
    checked on construction. transformers builds it from config.json; a user never needs to."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("quant_method", QUANT_METHOD)
        check_quantization_config(kwargs, "from_pretrained")
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.quant_method = QUANT_METHOD

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if not k.startswith("_")}


class _LoadedPVQLinear(PVQLinear):
    """A PVQLinear as transformers builds it: without the module's extra state (its config), which
    transformers' loader cannot fill from safetensors shards. The config comes from
    ``quantization_config`` instead, and the codes are checked against it after loading."""

    get_extra_state = nn.Module.get_extra_state

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.restore_signs()  # derived, never loaded: made on the CPU, not left on the meta device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # transformers 4.x hands every float tensor over in the loading dtype (float32 here, see
        # update_torch_dtype): the packed buffers go back to their own dtypes, exactly.
        for name, dtype in (("row_scale", torch.float16), ("levels", torch.float32)):
            if prefix + name in state_dict:
                state_dict[prefix + name] = state_dict[prefix + name].to(dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PVQHfQuantizer(HfQuantizer):
    """Loads pvq_cuda checkpoints (pre-quantized only: ``requires_calibration``)."""

    requires_calibration = True
    requires_parameters_quantization = False  # transformers 4.x

    def validate_environment(self, *args, **kwargs) -> None:
        check_quantization_config(self.quantization_config.to_dict(), "from_pretrained")

    def _process_model_before_weight_loading(self, model, keep_in_fp32_modules=None, **kwargs):
        q = self.quantization_config.to_dict()
        dense = set(q.get("modules_to_not_convert") or [])
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in dense]
        for name in names:
            module = model.get_submodule(name)
            layer = _LoadedPVQLinear(module.in_features, module.out_features, module.bias is not None,
                                     config_of(q, name), device="meta",
                                     dtype=None if module.bias is None else module.bias.dtype,
                                     act_config=act_config_of(q, name))
            layer.set_input_norm(input_norm_of(q, name))
            set_submodule(model, name, layer)
        # The placeholder that makes a load without pvq_cuda fail is not a tensor of this model.
        self._placeholder = placeholder_key(names)
        pattern = f"^{re.escape(self._placeholder)}$"
        ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None)  # 5.x: a set; 4.x: a list
        model._keys_to_ignore_on_load_unexpected = (ignore | {pattern} if isinstance(ignore, set)
                                                    else [*(ignore or []), pattern])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():
            if isinstance(module, PVQLinear) and module.codes.device.type != "meta":
                module.restore_signs()  # transformers left this non-persistent buffer unfilled
                try:
                    module.weight._validate()  # index < V(D, K) everywhere: the codes fit the config
                except ValueError as e:
                    raise ValueError(f"from_pretrained: PVQ layer {name!r}: {e}") from None
        requested = getattr(self, "_requested_dtype", None)
        if requested is not None and requested != torch.float32:
            model.to(requested)
            model.config.torch_dtype = requested
        make_save_pretrained_atomic(model)
        return model

    def get_state_dict_and_metadata(self, model, *args, **kwargs):  # 4.x passes safe_serialization
        """save_pretrained (transformers 5.x): the model's tensors plus the placeholder."""
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        pvq = [n for n, m in model.named_modules() if isinstance(m, PVQLinear)]
        if pvq:
            state[placeholder_key(pvq)] = torch.empty(0)
        return state, {}

    def update_torch_dtype(self, dtype):
        # transformers 4.x casts every float tensor of a quantized model to this dtype while loading,
        # the float16 row scales included (lossy for bfloat16). So load in float32, exact for them,
        # and cast the model to the requested dtype afterwards: PVQLinear keeps its packed buffers'
        # dtypes through .to(). (5.x keeps each tensor's declared dtype and never calls this.)
        self._requested_dtype = dtype
        return torch.float32

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # LoRA adapters train on top of PVQ layers (pvq_cuda.integrations.peft_lora); the codes stay.
        return True


def register() -> None:
    """Register ``"pvq"`` with transformers (idempotent: a second import of pvq_cuda is a no-op)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not PVQQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reloaded pvq_cuda's class
        register_quantization_config(QUANT_METHOD)(PVQQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not PVQHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(PVQHfQuantizer)


__all__ = ["PVQHfQuantizer", "PVQQuantizationConfig", "register"]
