// The CPU kernels' interface: raw pointers, a ChannelLayout and per-channel coefficients, no torch
// types, so that kernels.cpp can be compiled once per instruction set without sharing code with the
// host side (see types.h). The host side (ops_cpu.cpp) checks arguments, allocates and computes the
// per-channel coefficients; a kernel only walks memory.
//
// Per-channel arrays hold the accumulate type: double for Float64 tensors, float otherwise.
#pragma once

#include <cstdint>

#include "../types.h"

namespace inplace_abn::cpu {

struct KernelTable {
  const char* isa;
  // mean and biased variance of each channel (shifted two-pass sums per cache-resident block, merged in
  // double; a block whose float sums overflow is redone in double: finite wherever the result is).
  void (*statistics)(DType dtype, const void* x, const ChannelLayout& layout, void* mean, void* var);
  // x <- act((x - mean) * scale + bias) in place; preact (laid out like x), when not null, receives
  // (x - mean) * scale + bias. Centring first keeps the result exact for a mean far from 0.
  void (*normalize_act)(DType dtype, void* x, void* preact, const ChannelLayout& layout, const void* mean,
                        const void* scale, const void* bias, Activation activation, double activation_param);
  // sum(dz) and sum(dz * (z - bias)) of each channel, in double; y and dy share a layout. z_out (laid
  // out like y, or null) may receive z, for an input gradient into that memory: true if it did. ELU's
  // inverse is a log, then computed once per backward instead of twice.
  bool (*backward_reduce)(DType dtype, const void* y, const void* dy, void* z_out, const ChannelLayout& layout,
                          const void* bias, Activation activation, double activation_param, double* sum_dz,
                          double* sum_dz_centered);
  // dx = dz_scale * dz + centered_scale * (z - bias) + offset; y, dy and dx share a layout. dx_holds_z:
  // dx holds z on entry (backward_reduce returned true for it), read back instead of recovered from y.
  void (*backward_input)(DType dtype, const void* y, const void* dy, void* dx, bool dx_holds_z,
                         const ChannelLayout& layout, const void* dz_scale, const void* bias,
                         const void* centered_scale, const void* offset, Activation activation,
                         double activation_param);
};

// Calls chunk(body, begin, end) over chunks of [0, count) of at least `grain` values, on torch's
// intra-op thread pool. Defined once, in ops_cpu.cpp: kernels.cpp includes no torch header, whose
// inline functions would otherwise be shared between the instruction-set builds (see types.h).
void run_parallel(int64_t count, int64_t grain, void (*chunk)(const void* body, int64_t begin, int64_t end),
                  const void* body);

namespace baseline {
extern const KernelTable kernels;  // the compiler's default target (SSE2 on x86-64)
}
#if defined(ABN_HAVE_X86_ISAS)
namespace avx2 {
extern const KernelTable kernels;  // AVX2, FMA and F16C
}
namespace avx512 {
extern const KernelTable kernels;  // also AVX-512 F, CD, BW, DQ and VL, in 512-bit vectors
}
#endif

}  // namespace inplace_abn::cpu
