// Every pvq_cuda op schema, in one place. Kernels register per device in <family>/cpu.cpp (CPU) and
// <family>/cuda_glue.cpp (CUDA); fake (meta) kernels for torch.compile live in python/pvq_cuda/ops/.
#include <torch/library.h>

TORCH_LIBRARY(pvq_cuda, m) {
  m.def("search(Tensor x, int K) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("encode(Tensor pulses, int K) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("decode(Tensor index, int D, int K) -> Tensor", {at::Tag::pt2_compliant_tag});
  // One pass of the quantizer's metric pulse search (codec/metric_moves.h); CPU only.
  m.def("_metric_moves(Tensor pulses, Tensor w_metric, Tensor y_metric, Tensor fit_num, Tensor fit_den, "
        "Tensor w_sign, Tensor metric) -> (Tensor, Tensor)");
  // Packed layers (csrc/packed/packed_layer.h has the layout).
  m.def("_pack_codes(Tensor index, Tensor gain, int index_bits, int scale_bits) -> Tensor");
  m.def("_unpack_codes(Tensor codes, int rows, int groups, int index_bits, int scale_bits) -> (Tensor, Tensor)");
  m.def("pvq_dequantize(Tensor codes, Tensor row_scale, Tensor levels, int out_features, int in_features, int D, "
        "int K, int scale_bits) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("pvq_matmul(Tensor x, Tensor codes, Tensor row_scale, Tensor levels, Tensor? signs, Tensor? bias, "
        "int out_features, int D, int K, int scale_bits) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // pvq_matmul's input gradient (grad @ W, decoded on the fly), for its autograd formula.
  m.def("pvq_matmul_grad_input(Tensor grad, Tensor codes, Tensor row_scale, Tensor levels, Tensor? signs, "
        "int in_features, int D, int K, int scale_bits) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Rotation.
  m.def("hadamard_transform(Tensor x, Tensor? signs=None) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Activations (paper.md §7): the online encoder (rotate, search, index and gain per token) and the
  // W+A matmul of coded activations with a packed layer (csrc/activation/activation_code.h).
  m.def("encode_activations(Tensor x, Tensor? signs, Tensor levels, int D, int K, int gain_bits) -> "
        "(Tensor, Tensor, Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  m.def("wa_matmul(Tensor pulses, Tensor gain, Tensor scale, Tensor act_levels, Tensor codes, Tensor row_scale, "
        "Tensor levels, Tensor? bias, int out_features, int D, int K, int scale_bits, int act_D, int act_K) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // Calibration.
  m.def("hessian_accumulate_(Tensor(a!) H, Tensor x) -> ()", {at::Tag::pt2_compliant_tag});
}
