// Building blocks of the CUDA kernels (forward.cu, backward.cu): storage types, vector loads, the
// per-channel vector reader, the walk over a (N, C, S) tensor, the two reduction kernels and the
// element-wise kernel, and the launch planning. The per-element math is abn_math.h's.
//
// Work decomposition (64-bit indices throughout):
// - Element-wise passes walk the tensor as (outer, middle, inner) = (n, c, s) for Planes or
//   (n, s, c) for Rows. A dense tensor (no gaps) whose pointers are 16-byte aligned is walked as one
//   flat array in 16-byte vectors, whatever S and C are; any other tensor one element at a time.
//   A persistent grid (one wave of resident blocks) strides over it; each thread's position is
//   advanced by additions with carries, never by a division.
// - Reductions give each block one channel slice: Planes blocks reduce a contiguous range of one
//   channel's N * S values; Rows blocks reduce a range of rows for a tile of channels. Channels are
//   split into as many ranges as it takes to fill the GPU in whole waves; the per-range partial
//   results are then merged in a fixed order by a second small kernel (results do not depend on
//   timing). With one range per channel the first kernel writes the result itself.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
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

template <int V, typename T>
__device__ __forceinline__ void load(const T* p, acc_type<T> (&out)[V]) {
  const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_acc(pack.v[j]);
}

template <int V, typename T>
__device__ __forceinline__ void store(T* p, const acc_type<T> (&in)[V]) {
  Pack<T, V> pack;
#pragma unroll
  for (int j = 0; j < V; ++j) pack.v[j] = from_acc<T>(in[j]);
  *reinterpret_cast<Pack<T, V>*>(p) = pack;
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

inline bool aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
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
// Element-wise pass. Op::apply<W>(offset, coeff_of) processes W consecutive elements from element
// offset `offset`, coeff_of(j) giving the per-channel coefficients of element j.

template <int V, typename Op>
__global__ void __launch_bounds__(kThreads)
    elementwise_kernel(Op op, Walk w, Cursor step, int64_t vectors, int64_t numel) {
  const auto* coeffs = op.coeffs;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  Cursor at = locate(w, first * V);
  for (int64_t q = first; q < vectors; q += stride) {
    // Dense tensors are flat arrays; others are addressed through their strides (V == 1).
    const int64_t offset = V > 1 ? q * V : at.outer * w.stride_outer + at.middle * w.stride_middle + at.inner;
    if (at.inner + V <= w.inner) {  // the vector stays within one line
      if (w.planes) {
        const auto k = coeffs[at.middle];
        op.template apply<V>(offset, [&](int) { return k; });
      } else {
        const auto* k = coeffs + at.inner;
        op.template apply<V>(offset, [&](int j) { return k[j]; });
      }
    } else {  // it crosses into the next line(s)
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
    advance(at, step, w);
  }
  if (V > 1 && first == 0) {  // the elements after the last whole vector
    for (int64_t e = vectors * V; e < numel; ++e) {
      const Cursor c = locate(w, e);
      const auto k = coeffs[w.planes ? c.middle : c.inner];
      op.template apply<1>(e, [&](int) { return k; });
    }
  }
}

// Runs Op over the tensor, 16-byte vectors when `vectorize` (dense, aligned pointers).
template <typename T, typename Op>
void launch_elementwise(const LaunchContext& ctx, const Op& op, const ChannelLayout& l, bool vectorize) {
  const int64_t numel = l.N * l.C * l.S;
  if (numel == 0) return;
  const Walk w = walk_of(l);
  auto run = [&](auto width) {
    constexpr int V = decltype(width)::value;
    auto kernel = elementwise_kernel<V, Op>;
    const int64_t vectors = numel / V;
    const int64_t wave = resident_blocks(kernel, ctx.device);
    const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(vectors, kThreads), wave));
    const Cursor step = locate(w, blocks * kThreads * V);
    launch(kernel, dim3(unsigned(blocks)), dim3(kThreads), ctx, op, w, step, vectors, numel);
  };
  if (vectorize && dense(l)) {
    run(std::integral_constant<int, vector_width<T>()>{});
  } else {
    run(std::integral_constant<int, 1>{});
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions. An Op defines:
//   Item<W>                          the inputs of W consecutive elements
//   load<W>(offset, Item<W>&)        reads them
//   Slot                             a thread's running state for one channel
//   slot(c)                          the initial state for channel c (c < C)
//   prime(Slot&, value-of-first)     called with the first element a thread sees (for a shift)
//   add(Slot&, const Item&, j)       adds element j
//   fold(Slot&, count)               called every few iterations with the values added since
//   Partial partial(Slot&, count)    the slot's result; Partial is merged with merge()
//   finish(c, Partial)               writes channel c's result

struct ReducePlan {
  int64_t C;
  int64_t stride_n, stride_c, stride_s;
  int64_t line;       // Planes: vectors per plane (S / V); Rows: S (rows per n). At least 1.
  int64_t total;      // Planes: vectors per channel (N * S / V); Rows: rows (N * S)
  int64_t splits;     // ranges per channel (Planes) or per tile of channels (Rows)
  int64_t per_split;  // vectors (Planes) or rows (Rows) per range
};

constexpr int kFoldEvery = 64;  // values per slot between folds of a shifted sum

template <typename P>
__device__ __forceinline__ P shuffle_down(const P& p, int delta);

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

template <typename acc>
__device__ __forceinline__ Moments<acc> merge(const Moments<acc>& a, const Moments<acc>& b) {
  return merge_moments(a, b);
}

template <typename acc>
__device__ __forceinline__ Sums<acc> merge(const Sums<acc>& a, const Sums<acc>& b) {
  return {a.dz + b.dz, a.dz_centered + b.dz_centered};
}

// Lane 0 gets the merge of the warp's values, in a fixed order.
template <typename P>
__device__ __forceinline__ P warp_merge(P p) {
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) p = merge(p, shuffle_down(p, delta));
  return p;
}

// Planes: block (c, r) reduces range r of channel c's N * S values (N lines of S, V at a time).
template <typename T, int V, int U, typename Op>
__global__ void __launch_bounds__(kThreads)
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
  bool primed = false;
  int count = 0;
  while (q < end) {
    Item items[U];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (q < end) {
        op.template load<V>(base + n * plan.stride_n + k * V, items[u]);
        ++valid;
        q += kThreads;
        n += step_n;
        k += step_k;
        if (k >= plan.line) {
          k -= plan.line;
          ++n;
        }
      }
    }
    if (!primed) {
      op.prime(slot, items[0], 0);
      primed = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u < valid) {
#pragma unroll
        for (int j = 0; j < V; ++j) op.add(slot, items[u], j);
      }
    }
    count += valid * V;
    if (count >= kFoldEvery) {
      op.fold(slot, count);
      count = 0;
    }
  }
  Partial p = warp_merge(op.partial(slot, count));
  __shared__ Partial warps[kThreads / 32];
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
template <typename T, int V, int U, typename Op>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(Op op, ReducePlan plan, typename Op::Partial* partials) {
  using Partial = typename Op::Partial;
  using Item = typename Op::template Item<V>;
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int64_t c0 = (int64_t(blockIdx.x) * bx + tx) * V;
  const bool active = c0 < plan.C;  // V divides C when V > 1
  const int64_t range = blockIdx.y;
  const int64_t end = min_of(plan.total, (range + 1) * plan.per_split);
  int64_t r = range * plan.per_split + ty;
  int64_t n = r / plan.line, s = r % plan.line;
  const int64_t step_n = by / plan.line, step_s = by % plan.line;
  typename Op::Slot slots[V];
#pragma unroll
  for (int j = 0; j < V; ++j) slots[j] = op.slot(active ? c0 + j : 0);
  bool primed = false;
  int count = 0;
  while (active && r < end) {
    Item items[U];
    int valid = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (r < end) {
        op.template load<V>(n * plan.stride_n + s * plan.stride_s + c0, items[u]);
        ++valid;
        r += by;
        n += step_n;
        s += step_s;
        if (s >= plan.line) {
          s -= plan.line;
          ++n;
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
    count += valid;
    if (count >= kFoldEvery) {
#pragma unroll
      for (int j = 0; j < V; ++j) op.fold(slots[j], count);
      count = 0;
    }
  }
  // Merge over y in shared memory, halving the rows of threads each step.
  __shared__ Partial shared[kThreads * V];
  Partial* mine = shared + (ty * bx + tx) * V;
#pragma unroll
  for (int j = 0; j < V; ++j) mine[j] = op.partial(slots[j], count);
  for (int half = by / 2; half > 0; half /= 2) {
    __syncthreads();
    if (ty < half) {
      const Partial* other = mine + half * bx * V;
#pragma unroll
      for (int j = 0; j < V; ++j) mine[j] = merge(mine[j], other[j]);
    }
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (plan.splits == 1) {
        op.finish(c0 + j, mine[j]);
      } else {
        partials[(c0 + j) * plan.splits + range] = mine[j];
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

// Reduces every channel of the tensor with Op (16-byte vectors when `vectorize` and the lines are
// aligned to them). `ctx.workspace` provides the partial results when a channel is split.
template <typename T, typename Op>
void launch_reduction(const LaunchContext& ctx, const Op& op, const ChannelLayout& l, bool vectorize) {
  using Partial = typename Op::Partial;
  if (l.C == 0) return;
  constexpr int VW = vector_width<T>();
  const bool planes = l.kind == ChannelLayout::Kind::Planes;
  // Lines (planes of S, or rows of C) must start on vector boundaries to be read in vectors.
  const int64_t line = planes ? l.S : l.C;
  const int64_t other = planes ? l.stride_c : l.stride_s;
  const int64_t other_size = planes ? l.C : l.S;
  const bool vectors = vectorize && line % VW == 0 && (l.N <= 1 || l.stride_n % VW == 0) &&
                       (other_size <= 1 || other % VW == 0);
  ReducePlan plan{l.C, l.stride_n, l.stride_c, l.stride_s, 1, 0, 1, 1};
  Partial* partials = nullptr;
  auto allocate_partials = [&]() {
    if (plan.splits > 1) {
      partials = static_cast<Partial*>(ctx.workspace(int64_t(sizeof(Partial)) * l.C * plan.splits));
    }
  };
  auto run = [&](auto width) {
    constexpr int V = decltype(width)::value;
    constexpr int U = V > 1 ? 2 : (sizeof(T) < 4 ? 8 : 4);  // loads in flight per thread
    if (planes) {
      auto kernel = reduce_planes_kernel<T, V, U, Op>;
      plan.line = std::max<int64_t>(1, l.S / V);
      plan.total = l.N * (l.S / V);
      plan.splits = choose_splits(l.C, plan.total / (kThreads * U), resident_blocks(kernel, ctx.device));
      plan.per_split = std::max<int64_t>(1, ceil_div(plan.total, plan.splits));
      plan.splits = std::max<int64_t>(1, ceil_div(plan.total, plan.per_split));
      allocate_partials();
      launch(kernel, dim3(unsigned(l.C * plan.splits)), dim3(kThreads), ctx, op, plan, partials);
    } else {
      auto kernel = reduce_rows_kernel<T, V, U, Op>;
      int bx = 1;
      while (bx < 32 && bx * V < l.C) bx *= 2;
      const int by = kThreads / bx;
      const int64_t tiles = ceil_div(l.C, int64_t(bx) * V);
      plan.line = std::max<int64_t>(1, l.S);
      plan.total = l.N * l.S;
      const int64_t most = std::min<int64_t>(65535, plan.total / (int64_t(by) * U));
      plan.splits = choose_splits(tiles, most, resident_blocks(kernel, ctx.device));
      plan.per_split = std::max<int64_t>(1, ceil_div(plan.total, plan.splits));
      plan.splits = std::max<int64_t>(1, ceil_div(plan.total, plan.per_split));
      allocate_partials();
      launch(kernel, dim3(unsigned(tiles), unsigned(plan.splits)), dim3(bx, by), ctx, op, plan, partials);
    }
  };
  if (vectors) {
    run(std::integral_constant<int, VW>{});
  } else {
    run(std::integral_constant<int, 1>{});
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
