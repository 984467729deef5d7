// Plain types shared by the host code, the per-instruction-set CPU kernels and the CUDA kernels.
// No functions here: everything with code that is compiled once per CPU instruction set lives in a
// namespace of that instruction set (ABN_ISA_NAMESPACE_BEGIN), so the linker never merges an
// inline function built for AVX2 into the portable build (cmake/CheckIsaSymbols.cmake verifies).
#pragma once

#include <cstdint>

#if defined(ABN_CPU_ISA)
#define ABN_ISA_NAMESPACE_BEGIN inline namespace ABN_CPU_ISA {
#define ABN_ISA_NAMESPACE_END }
#else
#define ABN_ISA_NAMESPACE_BEGIN
#define ABN_ISA_NAMESPACE_END
#endif

namespace inplace_abn {

enum class Activation : int { Identity = 0, LeakyRelu = 1, Elu = 2, Relu = 3 };

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// A tensor of shape (N, C, *) walked as (N, C, S), S the product of the trailing sizes (element
// strides), in one of two layouts with a contiguous innermost run.
struct ChannelLayout {
  enum class Kind : int {
    Planes,  // each (n, c) is a contiguous run of S values (NCHW, "contiguous")
    Rows,    // each (n, s) is a contiguous run of C values (NHWC, "channels_last"; also (N, C))
  };
  Kind kind;
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;
};

}  // namespace inplace_abn
