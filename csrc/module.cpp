// The Python extension module. Importing it loads the shared library, whose static initialisers
// run the TORCH_LIBRARY registrations; no tensor crosses pybind11, so libtorch_python is not linked.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "pvq_cuda native ops (called through torch.ops.pvq_cuda)";
  m.def("cuda_built", [] { return bool(PVQ_WITH_CUDA); }, "True when the CUDA kernels were compiled in.");
}
