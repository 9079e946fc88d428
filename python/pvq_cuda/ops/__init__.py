"""Layer 1 of pvq_cuda: the native ops' Python faces, their fake kernels, and the codec's counting.

Importing this package loads the native library (``_C``), whose static initialisers register every
``torch.ops.pvq_cuda.*`` op; the modules here add typed wrappers, argument checks and the fake
(meta) kernels that torch.compile needs. Imports nothing else of pvq_cuda.
"""

import torch  # noqa: F401  (first: loads the libtorch that _C links against)

from . import _C  # loading the library runs the TORCH_LIBRARY registrations
from .activation import encode_activations, wa_matmul
from .codec import decode, encode, metric_moves, search
from .counting import MAX_INDEX_BITS, MAX_K, SUPPORTED_D, check_limits, index_bits, max_pulses, pyramid_size
from .hadamard import HADAMARD_BASES, HADAMARD_MAX_N, hadamard_split, hadamard_transform
from .hessian import hessian_accumulate_
from .packed import dequantize_packed, matmul_grad_input, matmul_packed, pack_codes, unpack_codes


def cuda_built() -> bool:
    """True when this build compiled the CUDA kernels."""
    return _C.cuda_built()


__all__ = [
    "HADAMARD_BASES", "HADAMARD_MAX_N", "MAX_INDEX_BITS", "MAX_K", "SUPPORTED_D", "check_limits", "cuda_built",
    "decode", "dequantize_packed", "encode", "encode_activations", "hadamard_split", "hadamard_transform",
    "hessian_accumulate_",
    "index_bits", "matmul_grad_input", "matmul_packed", "max_pulses", "metric_moves", "pack_codes", "pyramid_size",
    "search", "unpack_codes",
    "wa_matmul",
]
