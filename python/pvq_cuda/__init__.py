"""pvq_cuda: Pyramid Vector Quantization of LLM weights and activations, on CPU and CUDA.

The package is layered; each subpackage imports only from those below it (checked in CI by
import-linter, see pyproject.toml):

    apps          the pvq-cuda CLI, jobs, model loading, corpus, evaluation, reports, demo
    integrations  transformers, PEFT, lm-eval
    pipeline      quantize_model(s): block-by-block quantization of a causal LM
    quantization  quantize_weight, error feedback, Hessians, baselines, the method registry
    layers        PVQLinear, and PVQ layers in a model and its checkpoint directory
    format        configs and presets, gain levels, PVQWeight, the file container, checkpoints
    ops           the native ops' Python faces and the codec's counting
"""

from ._version import __version__  # noqa: F401  (pvq_cuda.__version__)
from .format import (ACT_PRESETS, FORMAT_VERSION, PRESETS, ActivationConfig, FormatError, PVQConfig, PVQWeight,
                     beta_gain_levels, load, pvq_matmul, read_metadata, register_serializable, rotation_signs, save)
from .layers import PVQLinear, load_quantized, save_quantized
from .ops import (HADAMARD_BASES, HADAMARD_MAX_N, MAX_INDEX_BITS, MAX_K, SUPPORTED_D, cuda_built, decode, encode,
                  hadamard_split, hadamard_transform, hessian_accumulate_, index_bits, max_pulses, pyramid_size, search)
from .pipeline import finetune_scales, quantize_model, quantize_models
from .quantization import HessianCollector, quantize_weight
from .integrations import register_all as _register_integrations

# AutoModelForCausalLM.from_pretrained on pvq checkpoints needs the "pvq" method registered with
# transformers: that happens here, on import (pvq_cuda.integrations.huggingface).
_register_integrations()

__all__ = [
    "ACT_PRESETS",
    "ActivationConfig",
    "FORMAT_VERSION",
    "FormatError",
    "HADAMARD_BASES",
    "HADAMARD_MAX_N",
    "HessianCollector",
    "MAX_INDEX_BITS",
    "MAX_K",
    "PRESETS",
    "PVQConfig",
    "PVQLinear",
    "PVQWeight",
    "SUPPORTED_D",
    "beta_gain_levels",
    "cuda_built",
    "decode",
    "encode",
    "finetune_scales",
    "hadamard_split",
    "hadamard_transform",
    "hessian_accumulate_",
    "index_bits",
    "load",
    "load_quantized",
    "max_pulses",
    "pvq_matmul",
    "pyramid_size",
    "quantize_model",
    "quantize_models",
    "quantize_weight",
    "read_metadata",
    "register_serializable",
    "rotation_signs",
    "save",
    "save_quantized",
    "search",
]
