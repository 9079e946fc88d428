"""The GPU machine as gpu_validation.sh sees it, and its gate: is this a GPU that pvq_cuda's CUDA
kernels run on?

    python bench/gpu_env.py              # versions, device properties, runtime (stdout)
    python bench/gpu_env.py --gate       # exit 1 unless torch sees a GPU, pvq_cuda.cuda_built() is
                                         # true and one CUDA decode equals the CPU's
    python bench/gpu_env.py --gate --rehearsal   # the CPU stands in for the GPU (no CUDA needed)
"""

from __future__ import annotations

import argparse
import os
from importlib import metadata
import platform
import sys


def report() -> None:
    print(f"python {sys.version.split()[0]} at {sys.executable}; {platform.platform()}; {os.cpu_count()} CPUs")
    kernel = platform.release()
    runtime = "gVisor (kernel 4.4.0)" if kernel.startswith("4.4.0") else ("Firecracker" if "fc" in kernel else "?")
    print(f"kernel {kernel}: runtime {runtime}")
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            l2 = getattr(p, "L2_cache_size", 0)
            print(f"cuda:{i} {p.name}: compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.1f} GiB, L2 {l2 / 2**20:.0f} MiB")
    for dist in ("transformers", "safetensors", "numpy", "pytest", "hypothesis", "scikit-build-core", "pybind11",
                 "cmake", "ninja", "triton"):
        try:
            print(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            print(f"{dist}: not installed")
    try:
        import pvq_cuda

        print(f"pvq_cuda {pvq_cuda.__version__} at {os.path.dirname(pvq_cuda.__file__)}, "
              f"cuda_built {pvq_cuda.cuda_built()}")
    except Exception as e:  # not built yet: the environment step runs before the build
        print(f"pvq_cuda: not importable ({type(e).__name__}: {e})")


def gate(rehearsal: bool) -> int:
    import torch

    import pvq_cuda

    built = pvq_cuda.cuda_built()
    print(f"torch {torch.__version__} sees a GPU: {torch.cuda.is_available()}; pvq_cuda.cuda_built(): {built}")
    if rehearsal:
        device = "cpu"
        print("rehearsal: the CPU stands in for the GPU")
    else:
        if not torch.cuda.is_available():
            print("GATE FAILED: torch sees no GPU")
            return 1
        if not built:
            print("GATE FAILED: pvq_cuda was built without its CUDA kernels (PVQ_WITH_CUDA=ON was not honoured?)")
            return 1
        major, minor = torch.cuda.get_device_capability()
        print(f"{torch.cuda.get_device_name()}: compute capability {major}.{minor}")
        device = "cuda"
    # One kernel end to end: a "no kernel image" or launch failure shows here, not in every step.
    V = pvq_cuda.pyramid_size(8, 16)
    index = torch.randint(0, V, (4096,), generator=torch.Generator().manual_seed(0))
    got = pvq_cuda.decode(index.to(device), 8, 16).cpu()
    if not torch.equal(got, pvq_cuda.decode(index, 8, 16)):
        print(f"GATE FAILED: decode on {device} differs from the CPU's")
        return 1
    # The error path, which formats numbers: a _C that carried its own libstdc++ (the first H200
    # run's toolchain linked it statically; CMakeLists.txt says why) segfaulted here and in every
    # test that checks a message, so stop before the steps rather than crash inside each of them.
    bad = torch.tensor([3, -5])
    try:
        pvq_cuda.decode(bad.to(device), 8, 16)
    except ValueError as err:
        if "element 1 (flattened) is -5" not in str(err):
            print(f"GATE FAILED: a bad index on {device} raised a garbled message: {err}")
            return 1
    else:
        print(f"GATE FAILED: a bad index on {device} raised nothing")
        return 1
    print(f"gate passed: decode on {device} equals the CPU's, and a bad index raises the CPU path's error")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gate", action="store_true")
    parser.add_argument("--rehearsal", action="store_true")
    args = parser.parse_args()
    if args.gate:
        sys.exit(gate(args.rehearsal))
    report()


if __name__ == "__main__":
    main()
