// The activation dtypes a launcher accepts, as a plain enum: launchers take raw pointers so that
// no .cu file includes a torch header, and the glue maps at::ScalarType onto this.
#pragma once

namespace pvq_cuda {

enum class FloatKind : int { kFloat32, kFloat16, kBFloat16 };

}  // namespace pvq_cuda
