// Building blocks of the CUDA kernels (forward.cu, backward.cu): storage types, vector loads, the
// per-channel vector reader, the walk over a (N, C, S) tensor, the two reduction kernels and the
// element-wise kernels, and the launch planning. The per-element math is abn_math.h's; the
// registers, spills and shared memory of every kernel are checked against resource_budgets.json
// (scripts/cuda_resources.py, in CI).
//
// Work decomposition (64-bit indices throughout):
// - Element-wise passes walk the tensor as (outer, middle, inner) = (n, c, s) for Planes or
//   (n, s, c) for Rows, in 16-byte vectors whenever the pointers allow it: a dense tensor (no gaps)
//   is one flat array, whatever S and C are, with a scalar head that brings the pointers to a
//   16-byte boundary (views at an odd offset) and a scalar tail; a tensor with gaps (a slice of the
//   channels, every other sample) is walked line by line when its lines start on vector boundaries.
//   A persistent grid (one wave of resident blocks) strides over it; each thread's position is
//   advanced by additions with carries, never by a division. For Rows the grid stride is a
//   multiple of C, so each thread's channels never change: it reads its per-channel coefficients
//   once, into registers, instead of once per element.
// - Reductions give each block one channel slice: Planes blocks reduce a range of one channel's
//   planes in 16-byte vectors aligned to memory (a plane of any size and offset is covered by the
//   aligned vectors that overlap it, the elements outside it masked); Rows blocks reduce a range of
//   rows for a tile of channels, 4 channels per thread (8 or 16 bytes) to stay within 64 registers.
//   Channels are split into as many ranges as it takes to fill the GPU in whole waves; the
//   per-range partial results are then merged in a fixed order by a second small kernel (results
//   do not depend on timing). With one range per channel the first kernel writes the result itself.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <initializer_list>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../abn_math.h"
#include "../check.h"
#include "kernels.h"

namespace inplace_abn::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel
constexpr int kVectorBytes = 16;

// ---------------------------------------------------------------------------------------------
// Storage types and conversions (float accumulation for the 16-bit types, round to nearest even).

__device__ __forceinline__ float to_acc(float v) {
  return v;
}
__device__ __forceinline__ double to_acc(double v) {
  return v;
}
__device__ __forceinline__ float to_acc(__half v) {
  return __half2float(v);
}
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// Elements per 16-byte vector.
template <typename T>
constexpr int vector_width() {
  return kVectorBytes / static_cast<int>(sizeof(T));
}

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Every vector access goes through these two; the CPU emulator (tests/cuda_emulation) checks that
// each one is aligned to its size, as the GPU requires (x86 would not notice).
#if defined(ABN_CUDA_EMULATION)
#define ABN_EXPECT_ALIGNED(pointer, bytes) ::emu::expect_aligned(pointer, bytes)
#else
#define ABN_EXPECT_ALIGNED(pointer, bytes) ((void)0)
#endif

// A __shared__ array (the CPU emulator gives each block a freshly poisoned one).
#if !defined(ABN_SHARED_ARRAY)
#define ABN_SHARED_ARRAY(T, name, count) __shared__ T name[count]
#endif

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  ABN_EXPECT_ALIGNED(p, sizeof(Pack<T, V>));
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& pack) {
  ABN_EXPECT_ALIGNED(p, sizeof(Pack<T, V>));
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
}

template <int V, typename T>
__device__ __forceinline__ void load(const T* p, acc_type<T> (&out)[V]) {
  const Pack<T, V> pack = load_pack<V>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_acc(pack.v[j]);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const acc_type<T> (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int j = 0; j < V; ++j) pack.v[j] = from_acc<T>(in[j]);
  store_pack<V>(p, pack);
}

// Element c of a per-channel vector of any float dtype, or `absent` when there is none.
template <typename acc>
__device__ __forceinline__ acc channel_value(const ChannelVector& v, int64_t c, acc absent) {
  if (v.data == nullptr) return absent;
  const int64_t i = c * v.stride;
  switch (v.dtype) {
    case DType::Float32:
      return static_cast<acc>(static_cast<const float*>(v.data)[i]);
    case DType::Float64:
      return static_cast<acc>(static_cast<const double*>(v.data)[i]);
    case DType::Float16:
      return static_cast<acc>(__half2float(static_cast<const __half*>(v.data)[i]));
    default:
      return static_cast<acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(v.data)[i]));
  }
}

// Writes element c of a per-channel output of any float dtype; the 16-bit types round from float,
// as the CPU operators do.
__device__ __forceinline__ void set_channel_value(const ChannelOutput& v, int64_t c, double value) {
  const int64_t i = c * v.stride;
  switch (v.dtype) {
    case DType::Float32:
      static_cast<float*>(v.data)[i] = static_cast<float>(value);
      break;
    case DType::Float64:
      static_cast<double*>(v.data)[i] = value;
      break;
    case DType::Float16:
      static_cast<__half*>(v.data)[i] = __float2half_rn(static_cast<float>(value));
      break;
    default:
      static_cast<__nv_bfloat16*>(v.data)[i] = __float2bfloat16_rn(static_cast<float>(value));
  }
}

// The accumulate type's DType (per-channel vectors the kernels write for themselves).
template <typename acc>
constexpr DType accumulate_dtype() {
  return std::is_same_v<acc, double> ? DType::Float64 : DType::Float32;
}

template <typename acc>
ActivationParam<acc> activation_param(double p) {
  return {static_cast<acc>(p), p > 0.0 ? static_cast<acc>(1.0 / p) : acc(0)};
}

// ---------------------------------------------------------------------------------------------
// Walking a tensor as (outer, middle, inner) with a contiguous inner dimension.

struct Walk {
  int64_t inner, middle;          // sizes (outer's is implied by the element count)
  int64_t stride_outer, stride_middle;
  bool planes;                    // the channel is the middle index (Planes) or the inner one (Rows)
};

inline Walk walk_of(const ChannelLayout& l) {
  if (l.kind == ChannelLayout::Kind::Planes) return {l.S, l.C, l.stride_n, l.stride_c, true};
  return {l.C, l.S, l.stride_n, l.stride_s, false};
}

// A position, or a fixed advance decomposed the same way.
struct Cursor {
  int64_t outer, middle, inner;
};

__host__ __device__ inline Cursor locate(const Walk& w, int64_t element) {
  const int64_t line = element / w.inner;
  return {line / w.middle, line % w.middle, element % w.inner};
}

__device__ __forceinline__ void advance(Cursor& c, const Cursor& step, const Walk& w) {
  c.inner += step.inner;
  if (c.inner >= w.inner) {
    c.inner -= w.inner;
    ++c.middle;
  }
  c.middle += step.middle;
  if (c.middle >= w.middle) {
    c.middle -= w.middle;
    ++c.outer;
  }
  c.outer += step.outer;
}

// Whether the tensor's elements fill one gap-free range in walk order.
inline bool dense(const ChannelLayout& l) {
  const Walk w = walk_of(l);
  return (l.N <= 1 || w.stride_outer == w.inner * w.middle) && (w.middle <= 1 || w.stride_middle == w.inner);
}

// Where the pointers (nullptr: absent) stand relative to a 16-byte boundary, if they all stand in
// the same place on an element boundary (so one scalar head aligns them all), else -1: the offset
// in bytes.
template <typename T>
int common_misalignment(std::initializer_list<const void*> pointers) {
  int lead = -1;
  for (const void* p : pointers) {
    if (p == nullptr) continue;
    const int m = int(reinterpret_cast<uintptr_t>(p) % kVectorBytes);
    if (m % int(sizeof(T)) != 0 || (lead >= 0 && m != lead)) return -1;
    lead = m;
  }
  return lead < 0 ? 0 : lead;
}

inline int64_t gcd_of(int64_t a, int64_t b) {
  while (b != 0) {
    const int64_t r = a % b;
    a = b;
    b = r;
  }
  return a;
}

// ---------------------------------------------------------------------------------------------
// Launch helpers: the only code that talks to the CUDA runtime. tests/cuda_emulation replaces them
// (ABN_CUDA_EMULATION) to run the kernels on the CPU, one thread per CUDA thread.

#if !defined(ABN_CUDA_EMULATION)

inline void check_cuda(cudaError_t status, const char* what) {
  ABN_CHECK(status == cudaSuccess, what, " failed: ", cudaGetErrorString(status));
}

// Launches kernel<<<grid, block, 0, stream>>>(args...) (outside of any dispatch lambda: a launch
// written inside a macro argument breaks on its commas).
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, const LaunchContext& ctx, const Args&... args) {
  kernel<<<grid, block, 0, static_cast<cudaStream_t>(ctx.stream)>>>(args...);
  check_cuda(cudaGetLastError(), "CUDA kernel launch");
}

// Blocks of kThreads threads of `kernel` that the device holds at once (one full wave). Cached
// (internal linkage: one cache per source file).
static int64_t resident_blocks_of(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  const std::pair<const void*, int> key(kernel, device);
  std::lock_guard<std::mutex> lock(mutex);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int sms = 0, per_sm = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int64_t blocks = std::max<int64_t>(1, int64_t(sms) * per_sm);
  cache.emplace(key, blocks);
  return blocks;
}

template <typename... Params>
int64_t resident_blocks(void (*kernel)(Params...), int device) {
  return resident_blocks_of(reinterpret_cast<const void*>(kernel), device);
}

#endif

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

__host__ __device__ inline int64_t min_of(int64_t a, int64_t b) {
  return a < b ? a : b;
}

// How many ranges to split each of `base` work items into (at most `most`) so that the blocks fill
// whole waves of `wave` blocks best (all blocks do the same work): the fewest splits that keep 99%
// of the device busy, else the best use found up to 4 waves.
inline int64_t choose_splits(int64_t base, int64_t most, int64_t wave) {
  int64_t best = 1;
  double best_use = 0;
  const int64_t limit = std::min(std::max<int64_t>(most, 1), std::max<int64_t>(1, ceil_div(4 * wave, base)));
  for (int64_t splits = 1; splits <= limit; ++splits) {
    const int64_t blocks = base * splits;
    const double use = double(blocks) / double(ceil_div(blocks, wave) * wave);
    if (use > best_use + 1e-9) {
      best = splits;
      best_use = use;
    }
    if (use >= 0.99) break;
  }
  return best;
}

// ---------------------------------------------------------------------------------------------
// Element-wise passes. Op::apply<W>(offset, coeff_of) processes W consecutive elements from element
// offset `offset`, coeff_of(j) giving the per-channel coefficients of element j; Op::coeffs is the
// per-channel coefficient array.

struct ElementwisePlan {
  Walk w;
  Cursor step;      // a thread's advance per iteration (the grid stride), in walk order
  int64_t head;     // flat walks: scalar elements before the first aligned vector
  int64_t vectors;  // whole vectors (after the head)
  int64_t numel;
  bool flat;        // dense: element e of the walk is at offset e; else addressed through the strides
};

__device__ __forceinline__ int64_t offset_of(const ElementwisePlan& p, const Cursor& at) {
  return at.outer * p.w.stride_outer + at.middle * p.w.stride_middle + at.inner;
}

// The scalar head and tail of a flat walk (fewer than V elements each): one element per thread of
// the first block.
template <int V, typename Op>
__device__ __forceinline__ void elementwise_ends(const Op& op, const ElementwisePlan& p, int64_t first) {
  if (!p.flat || V == 1) return;
  auto one = [&](int64_t e) {
    const Cursor c = locate(p.w, e);
    const auto k = op.coeffs[p.w.planes ? c.middle : c.inner];
    op.template apply<1>(e, [&](int) { return k; });
  };
  if (first < p.head) one(first);
  if (first < p.numel - p.head - p.vectors * V) one(p.head + p.vectors * V + first);
}

// Planes (and the scalar fallback of every layout): a vector's channel is read per vector.
template <int V, typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(Op op, ElementwisePlan p) {
  const auto* coeffs = op.coeffs;
  const Walk& w = p.w;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  Cursor at = locate(w, p.head + first * V);
  for (int64_t q = first; q < p.vectors; q += stride) {
    const int64_t offset = p.flat ? p.head + q * V : offset_of(p, at);
    if (at.inner + V <= w.inner) {  // the vector stays within one line
      if (w.planes) {
        const auto k = coeffs[at.middle];
        op.template apply<V>(offset, [&](int) { return k; });
      } else {
        const auto* k = coeffs + at.inner;
        op.template apply<V>(offset, [&](int j) { return k[j]; });
      }
    } else {  // it crosses into the next line(s) (flat walks only)
      int64_t channel[V];
      Cursor c = at;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        channel[j] = w.planes ? c.middle : c.inner;
        if (++c.inner == w.inner) {
          c.inner = 0;
          if (++c.middle == w.middle) c.middle = 0;
        }
      }
      op.template apply<V>(offset, [&](int j) { return coeffs[channel[j]]; });
    }
    advance(at, p.step, w);
  }
  elementwise_ends<V>(op, p, first);
}

// Rows in vectors: the grid stride is a multiple of C (or each thread makes at most one step), so a
// thread's V channels are the same at every step and their coefficients stay in registers.
template <int V, typename Op>
__global__ void __launch_bounds__(kThreads) elementwise_rows_kernel(Op op, ElementwisePlan p) {
  using Coeffs = std::remove_cv_t<std::remove_reference_t<decltype(op.coeffs[0])>>;
  const Walk& w = p.w;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  if (first < p.vectors) {
    Cursor at = locate(w, p.head + first * V);
    Coeffs k[V];
    int64_t c = at.inner;
#pragma unroll
    for (int j = 0; j < V; ++j) {  // a flat vector may wrap around the end of a row (C % V != 0)
      k[j] = op.coeffs[c];
      if (++c == w.inner) c = 0;
    }
    for (int64_t q = first; q < p.vectors; q += stride) {
      op.template apply<V>(p.flat ? p.head + q * V : offset_of(p, at), [&](int j) { return k[j]; });
      if (!p.flat) advance(at, p.step, w);
    }
  }
  elementwise_ends<V>(op, p, first);
}

// Runs Op over the tensor whose data pointers are `pointers` (all laid out as l): in 16-byte
// vectors when they allow it (see the top of this file), else one element at a time.
template <typename T, typename Op>
void launch_elementwise(const LaunchContext& ctx, const Op& op, const ChannelLayout& l,
                        std::initializer_list<const void*> pointers) {
  const int64_t numel = l.N * l.C * l.S;
  if (numel == 0) return;
  constexpr int VW = vector_width<T>();
  const Walk w = walk_of(l);
  const int lead = common_misalignment<T>(pointers);
  ElementwisePlan plan{w, {0, 0, 0}, 0, numel, numel, dense(l)};
  bool vectorize = false;
  if (plan.flat) {
    vectorize = lead >= 0;
    plan.head = vectorize ? std::min<int64_t>(numel, (kVectorBytes - lead) % kVectorBytes / int64_t(sizeof(T))) : 0;
  } else {  // lines: each must start on a vector boundary and hold whole vectors
    vectorize = lead == 0 && w.inner % VW == 0 && (l.N <= 1 || w.stride_outer % VW == 0) &&
                (w.middle <= 1 || w.stride_middle % VW == 0);
  }
  auto run = [&](auto kernel, auto width, bool rows) {
    constexpr int V = decltype(width)::value;
    plan.vectors = (numel - plan.head) / V;
    const int64_t wave = resident_blocks(kernel, ctx.device);
    const int64_t needed = std::max<int64_t>(1, ceil_div(plan.vectors, kThreads));
    int64_t blocks = std::min(needed, wave);
    if (rows && needed > wave) {
      const int64_t period = l.C / gcd_of(l.C, int64_t(kThreads) * V);  // blocks per multiple of C
      blocks = period <= wave ? wave / period * period : std::min(needed, period);
    }
    plan.step = locate(w, blocks * kThreads * V);
    launch(kernel, dim3(unsigned(blocks)), dim3(kThreads), ctx, op, plan);
  };
  if (!vectorize) {
    plan.head = 0;
    run(elementwise_kernel<1, Op>, std::integral_constant<int, 1>{}, false);
  } else if (w.planes) {
    run(elementwise_kernel<VW, Op>, std::integral_constant<int, VW>{}, false);
  } else {
    run(elementwise_rows_kernel<VW, Op>, std::integral_constant<int, VW>{}, true);
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions. An Op defines:
//   Item<W>                          the inputs of W consecutive elements (as stored: packed 16-bit)
//   load<W>(offset, Item<W>&)        reads them
//   Slot                             a thread's running state for one channel (a few floats)
//   slot(c)                          the initial state for channel c (c < C)
//   prime(Slot&, item, j)            called with the first element a thread sees (for a shift)
//   add(Slot&, const Item&, j)       adds element j
//   Partial flush(Slot&, added)      the result of the `added` values added since the last flush,
//                                    as a Partial (merged with merge()); resets the slot's sums
//   rebase(Slot&, const Partial&)    called after each flush with the thread's total so far
//   finish(c, Partial)               writes channel c's result
// Every kFoldEvery values a thread flushes its slots into its totals (in registers for Planes, in
// shared memory for Rows, which keeps 4 channels per thread within 64 registers).

struct ReducePlan {
  int64_t C;
  int64_t stride_n, stride_c, stride_s;
  int64_t S;          // values per plane
  int64_t line;       // Planes: vectors per plane (aligned vectors that can overlap it); Rows: S (rows per n)
  int64_t total;      // Planes: N * line; Rows: rows (N * S)
  int64_t splits;     // ranges per channel (Planes) or per tile of channels (Rows)
  int64_t per_split;  // vectors (Planes) or rows (Rows) per range
  int64_t lead;       // Planes: the data pointers' offset from a vector boundary, in elements
  // Rows: a thread's advance of blockDim.y rows: in s (rows within an n), in elements, and the
  // correction when s passes S.
  int64_t step_s, step_offset, wrap_offset;
};

constexpr int kFoldEvery = 64;  // values per slot between folds of a shifted sum

template <typename acc>
__device__ __forceinline__ Moments<acc> shuffle_down(const Moments<acc>& p, int delta) {
  return {__shfl_down_sync(0xffffffffu, p.count, delta), __shfl_down_sync(0xffffffffu, p.mean, delta),
          __shfl_down_sync(0xffffffffu, p.m2, delta)};
}

template <typename acc>
struct Sums {
  acc dz, dz_centered;
};

template <typename acc>
__device__ __forceinline__ Sums<acc> shuffle_down(const Sums<acc>& p, int delta) {
  return {__shfl_down_sync(0xffffffffu, p.dz, delta), __shfl_down_sync(0xffffffffu, p.dz_centered, delta)};
}

// 1 / x for x > 0 without a call: a double division (and __drcp_rn) calls a slow-path subroutine,
// and the registers saved around the call spill. A float reciprocal of the mantissa refined by two
// Newton steps is accurate to about an ulp of double.
__device__ __forceinline__ double reciprocal(double x) {
#if defined(__CUDA_ARCH__)
  int e;
  const double m = frexp(x, &e);  // x = m * 2^e, m in [0.5, 1)
  double r = double(__frcp_rn(float(m)));
  r = fma(r, fma(-m, r, 1.0), r);
  r = fma(r, fma(-m, r, 1.0), r);
  return ldexp(r, -e);
#else
  return 1.0 / x;
#endif
}

// Chan's merge (abn_math.h's merge_moments) with a reciprocal instead of the division.
__device__ __forceinline__ Moments<double> merge(const Moments<double>& a, const Moments<double>& b) {
  const double count = a.count + b.count;
  if (count == 0.0) return a;
  const double delta = b.mean - a.mean, b_share = b.count * reciprocal(count);
  return {count, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

template <typename acc>
__device__ __forceinline__ Sums<acc> merge(const Sums<acc>& a, const Sums<acc>& b) {
  return {a.dz + b.dz, a.dz_centered + b.dz_centered};
}

// Keeps the compiler from moving memory accesses across this point (register pressure control).
__device__ __forceinline__ void compiler_fence() {
  asm volatile("" ::: "memory");
}

// blockIdx / threadIdx read from their special registers again (volatile: not merged with an
// earlier read, so that they need not stay in registers through a loop).
#if defined(__CUDA_ARCH__)
#define ABN_FRESH_INDEX(name, reg)                    \
  __device__ __forceinline__ unsigned name() {        \
    unsigned v;                                       \
    asm volatile("mov.u32 %0, %%" reg ";" : "=r"(v)); \
    return v;                                         \
  }
ABN_FRESH_INDEX(fresh_block_x, "ctaid.x")
ABN_FRESH_INDEX(fresh_block_y, "ctaid.y")
ABN_FRESH_INDEX(fresh_thread_x, "tid.x")
ABN_FRESH_INDEX(fresh_thread_y, "tid.y")
#undef ABN_FRESH_INDEX
#else
__device__ __forceinline__ unsigned fresh_block_x() {
  return blockIdx.x;
}
__device__ __forceinline__ unsigned fresh_block_y() {
  return blockIdx.y;
}
__device__ __forceinline__ unsigned fresh_thread_x() {
  return threadIdx.x;
}
__device__ __forceinline__ unsigned fresh_thread_y() {
  return threadIdx.y;
}
#endif

// Lane 0 gets the merge of the warp's values, in a fixed order.
template <typename P>
__device__ __forceinline__ P warp_merge(P p) {
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) p = merge(p, shuffle_down(p, delta));
  return p;
}

// Planes: block (c, r) reduces range r of channel c's planes. Plane n starts `a` elements past a
// vector boundary (a = (lead + its offset) % V); its vectors k = 0, 1, ... cover the elements
// k * V - a ... k * V - a + V - 1 of the plane, those outside [0, S) masked (they belong to other
// channels or lie outside the tensor, in the same 16-byte granule as one of its elements).
template <typename T, int V, int U, typename Op>
__global__ void __launch_bounds__(kThreads, 3)
    reduce_planes_kernel(Op op, ReducePlan plan, typename Op::Partial* partials) {
  using Partial = typename Op::Partial;
  using Item = typename Op::template Item<V>;
  const int64_t c = blockIdx.x / plan.splits, range = blockIdx.x % plan.splits;
  const int64_t end = min_of(plan.total, (range + 1) * plan.per_split);
  int64_t q = range * plan.per_split + threadIdx.x;
  // (plane, vector in plane) of q, and of the step kThreads
  int64_t n = q / plan.line, k = q % plan.line;
  const int64_t step_n = kThreads / plan.line, step_k = kThreads % plan.line;
  const int64_t base = c * plan.stride_c;
  typename Op::Slot slot = op.slot(c);
  Partial total{};
  bool primed = false;
  int added = 0;
  while (q < end) {
    Item items[U];
    int lo[U], hi[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      lo[u] = hi[u] = 0;
      if (q < end) {
        const int64_t start = base + n * plan.stride_n;  // the plane's first element
        const int64_t first = k * V - (V > 1 ? (plan.lead + start) & (V - 1) : 0);  // the vector's, in the plane
        if (first < plan.S) {
          op.template load<V>(start + first, items[u]);
          lo[u] = first < 0 ? int(-first) : 0;
          hi[u] = int(min_of(V, plan.S - first));
        }
        q += kThreads;
        n += step_n;
        k += step_k;
        if (k >= plan.line) {
          k -= plan.line;
          ++n;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j >= lo[u] && j < hi[u]) {
          if (!primed) {
            op.prime(slot, items[u], j);
            primed = true;
          }
          op.add(slot, items[u], j);
        }
      }
      added += hi[u] - lo[u];
    }
    if (added >= kFoldEvery) {
      total = merge(total, op.flush(slot, added));
      op.rebase(slot, total);
      added = 0;
    }
  }
  Partial p = warp_merge(merge(total, op.flush(slot, added)));
  ABN_SHARED_ARRAY(Partial, warps, kThreads / 32);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warps[warp] = p;
  __syncthreads();
  if (warp == 0) {
    p = lane < kThreads / 32 ? warps[lane] : Partial{};
    p = warp_merge(p);
    if (lane == 0) {
      if (plan.splits == 1) {
        op.finish(c, p);
      } else {
        partials[c * plan.splits + range] = p;
      }
    }
  }
}

// Rows: block (tile, r) reduces range r of the rows for channels [tile * width, (tile + 1) * width),
// width = blockDim.x * V; threads (x, y) take V channels each and every blockDim.y-th row.
// At most 64 registers per thread: 4 blocks of 256 threads per SM.
template <typename T, int V, int U, typename Op>
__global__ void __launch_bounds__(kThreads, 4)
    reduce_rows_kernel(Op op, ReducePlan plan, typename Op::Partial* partials) {
  using Partial = typename Op::Partial;
  using Item = typename Op::template Item<V>;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t c0 = (int64_t(blockIdx.x) * bx + tx) * V;
  const bool active = c0 < plan.C;  // V divides C when V > 1
  const int64_t range = blockIdx.y;
  const int64_t end = min_of(plan.total, (range + 1) * plan.per_split);
  int64_t r = range * plan.per_split + ty;
  int64_t s = r % plan.line;
  // Offset of row r (n * stride_n + s * stride_s), advanced by additions.
  int64_t offset = (r / plan.line) * plan.stride_n + s * plan.stride_s + c0;
  // This thread's totals, merged over y at the end.
  ABN_SHARED_ARRAY(Partial, shared, kThreads * V);
  Partial* mine = shared + (ty * bx + tx) * V;
  typename Op::Slot slots[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    slots[j] = op.slot(active ? c0 + j : 0);
    mine[j] = Partial{};
  }
  bool primed = false;
  int added = 0;
  while (active && r < end) {
    Item items[U];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (r < end) {
        op.template load<V>(offset, items[u]);
        ++valid;
        r += by;
        offset += plan.step_offset;
        s += plan.step_s;
        if (s >= plan.line) {
          s -= plan.line;
          offset += plan.wrap_offset;
        }
      }
    }
    if (!primed) {
#pragma unroll
      for (int j = 0; j < V; ++j) op.prime(slots[j], items[0], j);
      primed = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < valid) {
#pragma unroll
        for (int j = 0; j < V; ++j) op.add(slots[j], items[u], j);
      }
    }
    added += valid;
    if (added >= kFoldEvery) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        mine[j] = merge(mine[j], op.flush(slots[j], added));
        op.rebase(slots[j], mine[j]);
        compiler_fence();  // one channel at a time: not 4 sets of double temporaries at once
      }
      added = 0;
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) mine[j] = merge(mine[j], op.flush(slots[j], added));
  // Merge over y in shared memory, halving the rows of threads each step.
  for (int half = by / 2; half > 0; half /= 2) {
    __syncthreads();
    if (ty < half) {
      const Partial* other = mine + half * bx * V;
#pragma unroll
      for (int j = 0; j < V; ++j) mine[j] = merge(mine[j], other[j]);
    }
  }
  // Indices read again rather than kept in registers through the loop.
  const int64_t c_first = (int64_t(fresh_block_x()) * bx + fresh_thread_x()) * V;
  if (fresh_thread_y() == 0 && c_first < plan.C) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (plan.splits == 1) {
        op.finish(c_first + j, mine[j]);
      } else {
        partials[(c_first + j) * plan.splits + fresh_block_y()] = mine[j];
      }
    }
  }
}

// One warp per channel merges its ranges' partial results in order and writes the result.
template <typename Op>
__global__ void __launch_bounds__(kThreads) finish_kernel(Op op, int64_t channels, int64_t splits,
                                                         const typename Op::Partial* partials) {
  using Partial = typename Op::Partial;
  const int64_t c = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (c >= channels) return;  // whole warps leave together
  Partial p{};
  for (int64_t r = lane; r < splits; r += 32) p = merge(p, partials[c * splits + r]);
  p = warp_merge(p);
  if (lane == 0) op.finish(c, p);
}

// Elements per load of the Rows reduction: 4 (8 bytes of a 16-bit type, 16 of float), 2 doubles.
template <typename T>
constexpr int rows_width() {
  return vector_width<T>() < 4 ? vector_width<T>() : 4;
}

// Reduces every channel of the tensor whose data pointers are `pointers` (laid out as l) with Op.
// `ctx.workspace` provides the partial results when a channel is split.
template <typename T, typename Op>
void launch_reduction(const LaunchContext& ctx, const Op& op, const ChannelLayout& l,
                      std::initializer_list<const void*> pointers) {
  using Partial = typename Op::Partial;
  if (l.C == 0) return;
  const bool planes = l.kind == ChannelLayout::Kind::Planes;
  const int lead = common_misalignment<T>(pointers);
  ReducePlan plan{l.C, l.stride_n, l.stride_c, l.stride_s, l.S, 1, 0, 1, 1, 0, 0, 0, 0};
  Partial* partials = nullptr;
  auto allocate_partials = [&]() {
    if (plan.splits > 1) {
      partials = static_cast<Partial*>(ctx.workspace(int64_t(sizeof(Partial)) * l.C * plan.splits));
    }
  };
  auto run_planes = [&](auto width) {
    constexpr int V = decltype(width)::value;
    constexpr int U = V > 1 ? 2 : (sizeof(T) < 4 ? 8 : 4);  // loads in flight per thread
    auto kernel = reduce_planes_kernel<T, V, U, Op>;
    plan.lead = V > 1 ? lead / int64_t(sizeof(T)) : 0;
    if constexpr (V == 1) {
      plan.line = l.S;
    } else if ((l.N <= 1 || l.stride_n % V == 0) && (l.C <= 1 || l.stride_c % V == 0)) {
      plan.line = ceil_div(plan.lead + l.S, V);  // every plane starts `lead` past a boundary
    } else {
      plan.line = (l.S + 2 * V - 2) / V;  // planes start anywhere
    }
    plan.line = std::max<int64_t>(1, plan.line);
    plan.total = l.N * plan.line;
    plan.splits = choose_splits(l.C, plan.total / (kThreads * U), resident_blocks(kernel, ctx.device));
    plan.per_split = std::max<int64_t>(1, ceil_div(plan.total, plan.splits));
    plan.splits = std::max<int64_t>(1, ceil_div(plan.total, plan.per_split));
    allocate_partials();
    launch(kernel, dim3(unsigned(l.C * plan.splits)), dim3(kThreads), ctx, op, plan, partials);
  };
  auto run_rows = [&](auto width) {
    constexpr int V = decltype(width)::value;
    constexpr int U = V > 1 ? 2 : (sizeof(T) < 4 ? 8 : 4);  // loads in flight per thread
    auto kernel = reduce_rows_kernel<T, V, U, Op>;
    int bx = 1;
    while (bx < 32 && bx * V < l.C) bx *= 2;
    const int by = kThreads / bx;
    const int64_t tiles = ceil_div(l.C, int64_t(bx) * V);
    plan.line = std::max<int64_t>(1, l.S);
    plan.total = l.N * l.S;
    plan.step_s = by % plan.line;
    plan.step_offset = (by / plan.line) * l.stride_n + plan.step_s * l.stride_s;
    plan.wrap_offset = l.stride_n - plan.line * l.stride_s;
    const int64_t most = std::min<int64_t>(65535, plan.total / (int64_t(by) * U));
    plan.splits = choose_splits(tiles, most, resident_blocks(kernel, ctx.device));
    plan.per_split = std::max<int64_t>(1, ceil_div(plan.total, plan.splits));
    plan.splits = std::max<int64_t>(1, ceil_div(plan.total, plan.per_split));
    allocate_partials();
    launch(kernel, dim3(unsigned(tiles), unsigned(plan.splits)), dim3(bx, by), ctx, op, plan, partials);
  };
  if (planes) {
    constexpr int VW = vector_width<T>();
    if (lead >= 0 && l.S >= VW) {
      run_planes(std::integral_constant<int, VW>{});
    } else {
      run_planes(std::integral_constant<int, 1>{});
    }
  } else {
    constexpr int VR = rows_width<T>();
    // Rows are read V channels at a time: C and the row strides must keep every load aligned.
    const bool vectors = lead >= 0 && lead % (VR * int(sizeof(T))) == 0 && l.C % VR == 0 &&
                         (l.N <= 1 || l.stride_n % VR == 0) && (l.S <= 1 || l.stride_s % VR == 0);
    if (vectors) {
      run_rows(std::integral_constant<int, VR>{});
    } else {
      run_rows(std::integral_constant<int, 1>{});
    }
  }
  if (plan.splits > 1) {
    launch(finish_kernel<Op>, dim3(unsigned(ceil_div(l.C, kThreads / 32))), dim3(kThreads), ctx, op, l.C, plan.splits,
           static_cast<const Partial*>(partials));
  }
}

// Calls f(T{}) with T the device storage type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32:
      return f(float{});
    case DType::Float64:
      return f(double{});
    case DType::Float16:
      return f(__half{});
    case DType::BFloat16:
      return f(__nv_bfloat16{});
  }
}

// Calls f(std::integral_constant<Activation, a>{}) with the activation the kernels implement:
// identity is leaky_relu with slope 1 (exact: multiplying by 1 changes nothing), which halves the
// number of kernels to compile. Returns the parameter to use.
template <typename F>
void dispatch_activation(Activation a, double& param, const F& f) {
  switch (a) {
    case Activation::Identity:
      param = 1.0;
      return f(std::integral_constant<Activation, Activation::LeakyRelu>{});
    case Activation::LeakyRelu:
      return f(std::integral_constant<Activation, Activation::LeakyRelu>{});
    case Activation::Elu:
      return f(std::integral_constant<Activation, Activation::Elu>{});
    case Activation::Relu:
      return f(std::integral_constant<Activation, Activation::Relu>{});
  }
}

}  // namespace inplace_abn::cuda
