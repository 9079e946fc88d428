"""pvq_cuda: Pyramid Vector Quantization of LLM weights and activations, on CPU and CUDA."""

import torch  # noqa: F401  (first: loads the libtorch that _C links against)

from . import _C  # loading the library runs the TORCH_LIBRARY registrations
from .counting import MAX_INDEX_BITS, MAX_K, SUPPORTED_D, index_bits, max_pulses, pyramid_size
from .ops import HADAMARD_BASES, HADAMARD_MAX_N, decode, encode, hadamard_split, hadamard_transform, search

__version__ = "0.1.0"


def cuda_built() -> bool:
    """True when this build compiled the CUDA kernels."""
    return _C.cuda_built()


__all__ = [
    "HADAMARD_BASES",
    "HADAMARD_MAX_N",
    "MAX_INDEX_BITS",
    "MAX_K",
    "SUPPORTED_D",
    "cuda_built",
    "decode",
    "encode",
    "hadamard_split",
    "hadamard_transform",
    "index_bits",
    "max_pulses",
    "pyramid_size",
    "search",
]
