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
