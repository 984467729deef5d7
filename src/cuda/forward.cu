// Forward kernels: one-pass per-channel statistics and the in-place normalize + activate pass.
#include "common.cuh"

namespace inplace_abn::cuda {
namespace {

// Mean and biased variance. Each thread sums its values' deviations from a shift (its first value,
// then its running mean) in the accumulate type, which is exact enough when the shift is close to
// the mean, and every kFoldEvery values flushes those sums into its (count, mean, M2) in double
// with Chan's merge; threads, blocks and ranges are merged with Chan's formula in double too. So the float
// sums only ever hold up to kFoldEvery squared deviations from a recent mean (no overflow below
// deviations of ~2e18, where torch's float Welford M2 overflows too), and M2 of any number of values
// is kept in double. One reciprocal per flush, no division per value.
template <typename T>
struct StatisticsOp {
  using acc = acc_type<T>;
  using Partial = Moments<double>;
  template <int V>
  struct Item {
    Pack<T, V> x;
  };
  struct Slot {
    acc shift, sum, sum_squares;
  };

  const T* x;
  acc* mean;
  acc* var;

  template <int V>
  __device__ void load(int64_t offset, Item<V>& item) const {
    item.x = load_pack<V>(x + offset);
  }
  __device__ Slot slot(int64_t) const {
    return {acc(0), acc(0), acc(0)};
  }
  template <typename I>
  __device__ void prime(Slot& s, const I& item, int j) const {
    s.shift = to_acc(item.x.v[j]);
  }
  template <typename I>
  __device__ void add(Slot& s, const I& item, int j) const {
    const acc d = to_acc(item.x.v[j]) - s.shift;
    s.sum += d;
    s.sum_squares += d * d;
  }
  __device__ Partial flush(Slot& s, int added) const {
    if (added == 0) return {0.0, 0.0, 0.0};
    const double n = double(added), sum = double(s.sum), mean_shift = sum * reciprocal(n);
    const double m2 = double(s.sum_squares) - sum * mean_shift;
    s.sum = s.sum_squares = acc(0);
    return {n, double(s.shift) + mean_shift, m2 < 0.0 ? 0.0 : m2};  // (NaN stays NaN)
  }
  __device__ void rebase(Slot& s, const Partial& total) const {
    s.shift = acc(total.mean);
  }
  // No values (N * S == 0): NaN, as torch gives.
  __device__ void finish(int64_t c, const Partial& p) const {
    const bool empty = p.count == 0.0;
    mean[c] = empty ? std::numeric_limits<acc>::quiet_NaN() : acc(p.mean);
    var[c] = empty ? std::numeric_limits<acc>::quiet_NaN() : acc(p.m2 * reciprocal(p.count));
  }
};

// x <- act((x - mean) * scale + bias), keeping the pre-activation in preact when asked.
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
      v[j] = normalize(v[j], k.mean, k.scale, k.bias);
    }
    if (preact != nullptr) store<V>(preact + offset, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = ActivationOps<act>::forward(v[j], param);
    store<V>(x + offset, v);
  }
};

// Running statistics to update from the batch's (mean, var) (train_forward; mean.data == nullptr: none).
struct RunningUpdate {
  ChannelOutput mean, var;
  double momentum, unbias;
};

// One thread per channel: the coefficients of NormalizeOp, and the running statistics' update.
template <typename acc>
__global__ void __launch_bounds__(kThreads)
    normalize_coeffs_kernel(int64_t channels, ChannelVector mean, ChannelVector var, ChannelVector weight,
                            ChannelVector bias, acc eps, RunningUpdate running, NormalizeCoeffs<acc>* out) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  const acc m = channel_value(mean, c, acc(0)), v = channel_value(var, c, acc(1));
  const acc s = affine_scale(channel_value(weight, c, acc(1)), weight.data != nullptr, eps);
  out[c] = normalize_coeffs(m, v, s, channel_value(bias, c, acc(0)), eps);
  if (running.mean.data != nullptr) {
    const ChannelVector old_mean{running.mean.data, running.mean.stride, running.mean.dtype};
    const ChannelVector old_var{running.var.data, running.var.stride, running.var.dtype};
    set_channel_value(running.mean, c, running_update(channel_value(old_mean, c, 0.0), double(m), running.momentum));
    set_channel_value(running.var, c,
                      running_update(channel_value(old_var, c, 0.0), double(v) * running.unbias, running.momentum));
  }
}

void normalize_with(const LaunchContext& ctx, DType dtype, void* x, void* preact, const ChannelLayout& layout,
                    ChannelVector mean, ChannelVector var, ChannelVector weight, ChannelVector bias, double eps,
                    Activation activation, double activation_param_value, const RunningUpdate& running) {
  if (layout.C == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    auto* coeffs = static_cast<NormalizeCoeffs<acc>*>(ctx.workspace(int64_t(sizeof(NormalizeCoeffs<acc>)) * layout.C));
    launch(normalize_coeffs_kernel<acc>, dim3(unsigned(ceil_div(layout.C, kThreads))), dim3(kThreads), ctx, layout.C,
           mean, var, weight, bias, static_cast<acc>(eps), running, coeffs);
    double p = activation_param_value;
    dispatch_activation(activation, p, [&](auto act) {
      const NormalizeOp<T, decltype(act)::value> op{static_cast<T*>(x), static_cast<T*>(preact), coeffs,
                                                   activation_param<acc>(p)};
      launch_elementwise<T>(ctx, op, layout, {x, preact});
    });
  });
}

}  // namespace

void statistics(const LaunchContext& ctx, DType dtype, const void* x, const ChannelLayout& layout, void* mean,
                void* var) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    const StatisticsOp<T> op{static_cast<const T*>(x), static_cast<acc*>(mean), static_cast<acc*>(var)};
    launch_reduction<T>(ctx, op, layout, {x});
  });
}

void normalize_act(const LaunchContext& ctx, DType dtype, void* x, void* preact, const ChannelLayout& layout,
                   ChannelVector mean, ChannelVector var, ChannelVector weight, ChannelVector bias, double eps,
                   Activation activation, double activation_param_value) {
  normalize_with(ctx, dtype, x, preact, layout, mean, var, weight, bias, eps, activation, activation_param_value,
                 RunningUpdate{});
}

void train_forward(const LaunchContext& ctx, DType dtype, void* x, void* preact, const ChannelLayout& layout,
                   ChannelVector weight, ChannelVector bias, ChannelOutput running_mean, ChannelOutput running_var,
                   double momentum, double eps, Activation activation, double activation_param_value, void* var) {
  if (layout.C == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using acc = acc_type<decltype(tag)>;
    void* mean = ctx.workspace(int64_t(sizeof(acc)) * layout.C);
    statistics(ctx, dtype, x, layout, mean, var);
    const int64_t count = layout.N * layout.S;
    RunningUpdate running{};
    if (running_mean.data != nullptr && running_var.data != nullptr && count > 0) {
      running = {running_mean, running_var, momentum, unbias_factor(count)};
    }
    const DType acc_dtype = accumulate_dtype<acc>();
    normalize_with(ctx, dtype, x, preact, layout, {mean, 1, acc_dtype}, {var, 1, acc_dtype}, weight, bias, eps,
                   activation, activation_param_value, running);
  });
}

}  // namespace inplace_abn::cuda
