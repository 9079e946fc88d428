// PVQ_DEVICE_CODE is 1 in device code and 0 in host code. Device code is what nvcc compiles for a
// GPU (__CUDA_ARCH__), and also what the host emulator (tests/cuda_emulation) compiles with g++:
// there the device branches must be the ones that run, or the emulation would test host code. Every
// device/host branch of the kernels' headers tests this one macro.
#pragma once

#if defined(__CUDA_ARCH__) || defined(PVQ_CUDA_EMULATION)
#define PVQ_DEVICE_CODE 1
#else
#define PVQ_DEVICE_CODE 0
#endif

// A device function the compiler must not inline: nvcc's __noinline__ keyword, which g++ (the host
// emulator) does not know and which cannot be a macro there (libstdc++ spells its own attribute
// __attribute__((__noinline__))).
#if defined(__CUDACC__)
#define PVQ_NOINLINE __noinline__
#else
#define PVQ_NOINLINE __attribute__((noinline))
#endif
