"""Argument checks shared by the ops' Python faces and their fake (meta) kernels.

The C++ kernels check again (csrc/<family>/args.cpp), so calling ``torch.ops.pvq_cuda.*`` directly
is just as safe; these checks exist so that torch.compile's fake kernels raise the same errors.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def check_tensor(op: str, name: str, t, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {allowed}; got {str(t.dtype).removeprefix('torch.')}")
    if t.layout != torch.strided:
        raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{op}: {name} must be on a CPU or CUDA device, got {t.device}")
    if t.device.type == "cuda" and not torch.ops.pvq_cuda.decode.default.has_kernel_for_dispatch_key("CUDA"):
        raise RuntimeError(
            f"{op}: {name} is on {t.device}, but this pvq_cuda build has no CUDA kernels "
            "(it was built without a CUDA torch or without nvcc); rebuild with PVQ_WITH_CUDA=ON"
        )


def check_last_dim(op: str, name: str, t: torch.Tensor, last: str = "D") -> int:
    if t.dim() == 0:
        raise ValueError(f"{op}: {name} must have shape [..., {last}], got a 0-d tensor")
    # D picks the kernel, so a symbolic D is specialized (guarded) rather than traced.
    return int(t.shape[-1])


def check_float_input(op: str, name: str, t) -> None:
    """An activation-like input: float32, float16 or bfloat16 anywhere, float64 on the CPU (where
    the kernels compute in double: an exact reference, and what gradcheck needs)."""
    if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type in ("cpu", "meta"):
        check_tensor(op, name, t, (torch.float64,))
        return
    if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
        raise TypeError(f"{op}: {name} must have dtype float32, float16 or bfloat16 on {t.device} (float64 runs on "
                        f"the CPU only); got float64")
    check_tensor(op, name, t, FLOAT_DTYPES)
