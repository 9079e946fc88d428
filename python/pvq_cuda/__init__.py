"""pvq_cuda: Pyramid Vector Quantization of LLM weights and activations, on CPU and CUDA."""

import torch  # noqa: F401  (first: loads the libtorch that _C links against)

from . import _C  # loading the library runs the TORCH_LIBRARY registrations
from .config import PRESETS, PVQConfig
from .counting import MAX_INDEX_BITS, MAX_K, SUPPORTED_D, index_bits, max_pulses, pyramid_size
from .gain import beta_gain_levels
from .hessian import HessianCollector
from .io import FORMAT_VERSION, FormatError, load, read_metadata, register_serializable, save
from .checkpoint import load_quantized, save_quantized
from .linear import PVQLinear
from .model import quantize_model, quantize_models
from .ops import (HADAMARD_BASES, HADAMARD_MAX_N, decode, encode, hadamard_split, hadamard_transform,
                  hessian_accumulate_, pvq_matmul, search)
from .quantize import quantize_weight
from .weight import PVQWeight, rotation_signs

__version__ = "0.1.0"


def cuda_built() -> bool:
    """True when this build compiled the CUDA kernels."""
    return _C.cuda_built()


__all__ = [
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
