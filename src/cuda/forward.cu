// Forward kernels: one-pass per-channel statistics and the in-place normalize + activate pass.
#include "common.cuh"

namespace inplace_abn::cuda {
namespace {

// Mean and biased variance. Each thread sums its values' deviations from a shift (its first value,
// then its running mean), which is exact enough when the shift is close to the mean, and every
// kFoldEvery values folds those sums into its moments with Chan's merge; threads, blocks and ranges
// are merged with Chan's formula too. One division per fold, none per value.
template <typename T>
struct StatisticsOp {
  using acc = acc_type<T>;
  using Partial = Moments<acc>;
  template <int V>
  struct Item {
    acc x[V];
  };
  struct Slot {
    acc shift, sum, sum_squares;
    Moments<acc> moments;
  };

  const T* x;
  acc* mean;
  acc* var;

  template <int V>
  __device__ void load(int64_t offset, Item<V>& item) const {
    cuda::load<V>(x + offset, item.x);
  }
  __device__ Slot slot(int64_t) const {
    return {acc(0), acc(0), acc(0), {acc(0), acc(0), acc(0)}};
  }
  template <typename I>
  __device__ void prime(Slot& s, const I& item, int j) const {
    s.shift = item.x[j];
  }
  template <typename I>
  __device__ void add(Slot& s, const I& item, int j) const {
    const acc d = item.x[j] - s.shift;
    s.sum += d;
    s.sum_squares += d * d;
  }
  __device__ void fold(Slot& s, int count) const {
    if (count == 0) return;
    const acc n = acc(count);
    const acc mean_shift = s.sum / n;
    const acc m2 = s.sum_squares - s.sum * mean_shift;
    s.moments = merge_moments(s.moments, Moments<acc>{n, s.shift + mean_shift, m2 > acc(0) ? m2 : acc(0)});
    s.shift = s.moments.mean;
    s.sum = s.sum_squares = acc(0);
  }
  __device__ Partial partial(Slot& s, int count) const {
    fold(s, count);
    return s.moments;
  }
  __device__ void finish(int64_t c, const Partial& p) const {
    mean[c] = p.mean;
    var[c] = p.count > acc(0) ? p.m2 / p.count : acc(0);
  }
};

// x <- act(x * scale + shift), keeping x * scale + shift in preact when asked.
template <typename T, Activation act>
struct NormalizeOp {
  using acc = acc_type<T>;
  T* x;
  T* preact;
  const NormalizeCoeffs<acc>* coeffs;
  ActivationParam<acc> param;

  template <int V, typename Coeffs>
  __device__ __forceinline__ void apply(int64_t offset, const Coeffs& coeff_of) const {
    acc v[V];
    load<V>(x + offset, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const NormalizeCoeffs<acc> k = coeff_of(j);
      v[j] = v[j] * k.scale + k.shift;
    }
    if (preact != nullptr) store<V>(preact + offset, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = ActivationOps<act>::forward(v[j], param);
    store<V>(x + offset, v);
  }
};

template <typename acc>
__global__ void __launch_bounds__(kThreads) normalize_coeffs_kernel(int64_t channels, ChannelVector mean,
                                                                   ChannelVector var, ChannelVector weight,
                                                                   ChannelVector bias, acc eps,
                                                                   NormalizeCoeffs<acc>* out) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  const acc s = affine_scale(channel_value(weight, c, acc(1)), weight.data != nullptr, eps);
  out[c] = normalize_coeffs(channel_value(mean, c, acc(0)), channel_value(var, c, acc(1)), s,
                            channel_value(bias, c, acc(0)), eps);
}

}  // namespace

void statistics(const LaunchContext& ctx, DType dtype, const void* x, const ChannelLayout& layout, void* mean,
                void* var) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    const StatisticsOp<T> op{static_cast<const T*>(x), static_cast<acc*>(mean), static_cast<acc*>(var)};
    launch_reduction<T>(ctx, op, layout, aligned(x));
  });
}

void normalize_act(const LaunchContext& ctx, DType dtype, void* x, void* preact, const ChannelLayout& layout,
                   ChannelVector mean, ChannelVector var, ChannelVector weight, ChannelVector bias, double eps,
                   Activation activation, double activation_param_value) {
  if (layout.C == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    auto* coeffs = static_cast<NormalizeCoeffs<acc>*>(ctx.workspace(int64_t(sizeof(NormalizeCoeffs<acc>)) * layout.C));
    launch(normalize_coeffs_kernel<acc>, dim3(unsigned(ceil_div(layout.C, kThreads))), dim3(kThreads), ctx, layout.C,
           mean, var, weight, bias, static_cast<acc>(eps), coeffs);
    const bool vectorize = aligned(x) && (preact == nullptr || aligned(preact));
    double p = activation_param_value;
    dispatch_activation(activation, p, [&](auto act) {
      const NormalizeOp<T, decltype(act)::value> op{static_cast<T*>(x), static_cast<T*>(preact), coeffs,
                                                   activation_param<acc>(p)};
      launch_elementwise<T>(ctx, op, layout, vectorize);
    });
  });
}

}  // namespace inplace_abn::cuda
