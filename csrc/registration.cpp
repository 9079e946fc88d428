// Every pvq_cuda op schema, in one place. Kernels register per device: codec_cpu.cpp and
// hadamard_cpu.cpp (CPU), cuda/codec_cuda.cpp and cuda/hadamard_cuda.cpp (CUDA); shape functions for
// torch.compile live in python/pvq_cuda/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pvq_cuda, m) {
  m.def("search(Tensor x, int K) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("encode(Tensor pulses, int K) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("decode(Tensor index, int D, int K) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("hadamard_transform(Tensor x, Tensor? signs=None) -> Tensor", {at::Tag::pt2_compliant_tag});
}
