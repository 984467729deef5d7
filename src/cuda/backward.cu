// Backward kernels: the per-channel reduction of sum(dz) and sum(dz * xhat), and the input gradient,
// both recovering (z, dz) from the kept output y (the pre-activation for relu) and dy.
#include "common.cuh"

namespace inplace_abn::cuda {
namespace {

// sum(dz) and sum(dz * (z - b)); the second is divided by s = |w| + eps once per channel at the end
// (xhat = (z - b) / s), as the CPU kernels do. The terms cancel (the sums are small next to them), so
// each thread adds runs of kFoldEvery values in the accumulate type and flushes them into double; the
// merges across threads, blocks and ranges are in double too.
template <typename T, Activation act>
struct GradientSumsOp {
  using acc = acc_type<T>;
  using Partial = Sums<double>;
  template <int V>
  struct Item {
    Pack<T, V> y, dy;
  };
  struct Slot {
    acc bias, dz, dz_centered;
  };

  const T* y;
  const T* dy;
  ChannelVector weight, bias;
  acc eps;
  ActivationParam<acc> param;
  acc* sum_dz;
  acc* sum_dz_xhat;

  template <int V>
  __device__ void load(int64_t offset, Item<V>& item) const {
    item.y = load_pack<V>(y + offset);
    item.dy = load_pack<V>(dy + offset);
  }
  __device__ Slot slot(int64_t c) const {
    return {channel_value(bias, c, acc(0)), acc(0), acc(0)};
  }
  template <typename I>
  __device__ void prime(Slot&, const I&, int) const {}
  template <typename I>
  __device__ void add(Slot& s, const I& item, int j) const {
    acc z, dz;
    ActivationOps<act>::recover(to_acc(item.y.v[j]), to_acc(item.dy.v[j]), param, z, dz);
    s.dz += dz;
    s.dz_centered += dz * (z - s.bias);
  }
  __device__ Partial flush(Slot& s, int) const {
    const Partial run{double(s.dz), double(s.dz_centered)};
    s.dz = s.dz_centered = acc(0);
    return run;
  }
  __device__ void rebase(Slot&, const Partial&) const {}
  __device__ void finish(int64_t c, const Partial& p) const {
    const double scale = affine_scale(channel_value(weight, c, acc(1)), weight.data != nullptr, eps);
    sum_dz[c] = acc(p.dz);
    sum_dz_xhat[c] = acc(p.dz_centered * reciprocal(scale));
  }
};

// dx = dz_scale * dz + centered_scale * (z - b) + offset (abn_math.h's input_grad).
template <typename T, Activation act>
struct InputGradOp {
  using acc = acc_type<T>;
  const T* y;
  const T* dy;
  T* dx;
  const InputGradCoeffs<acc>* coeffs;
  ActivationParam<acc> param;

  template <int V, typename Coeffs>
  __device__ __forceinline__ void apply(int64_t offset, const Coeffs& coeff_of) const {
    acc vy[V], vdy[V];
    load<V>(y + offset, vy);
    load<V>(dy + offset, vdy);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc z, dz;
      ActivationOps<act>::recover(vy[j], vdy[j], param, z, dz);
      vy[j] = input_grad(coeff_of(j), z, dz);
    }
    store<V>(dx + offset, vy);
  }
};

// The parameters' gradients to write from the sums (train_backward; data == nullptr: not wanted).
struct ParamGrads {
  ChannelOutput dweight, dbias;
};

// One thread per channel: the coefficients of InputGradOp, and dweight / dbias.
template <typename acc>
__global__ void __launch_bounds__(kThreads)
    input_grad_coeffs_kernel(int64_t channels, ChannelVector var, ChannelVector weight, ChannelVector bias,
                             ChannelVector sum_dz, ChannelVector sum_dz_xhat, acc count, acc eps, ParamGrads grads,
                             InputGradCoeffs<acc>* out) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= channels) return;
  const acc w = channel_value(weight, c, acc(1));
  const acc s1 = channel_value(sum_dz, c, acc(0)), s2 = channel_value(sum_dz_xhat, c, acc(0));
  out[c] = input_grad_coeffs(channel_value(var, c, acc(1)), affine_scale(w, weight.data != nullptr, eps),
                             channel_value(bias, c, acc(0)), eps, sum_dz.data != nullptr, s1, s2, count);
  if (grads.dweight.data != nullptr) set_channel_value(grads.dweight, c, double(weight_grad(w, s2)));
  if (grads.dbias.data != nullptr) set_channel_value(grads.dbias, c, double(s1));
}

void input_grad_with(const LaunchContext& ctx, DType dtype, const void* y, const void* dy, void* dx,
                     const ChannelLayout& layout, ChannelVector var, ChannelVector weight, ChannelVector bias,
                     ChannelVector sum_dz, ChannelVector sum_dz_xhat, int64_t count, double eps, Activation activation,
                     double activation_param_value, const ParamGrads& grads) {
  if (layout.C == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    auto* coeffs = static_cast<InputGradCoeffs<acc>*>(ctx.workspace(int64_t(sizeof(InputGradCoeffs<acc>)) * layout.C));
    launch(input_grad_coeffs_kernel<acc>, dim3(unsigned(ceil_div(layout.C, kThreads))), dim3(kThreads), ctx, layout.C,
           var, weight, bias, sum_dz, sum_dz_xhat, static_cast<acc>(count), static_cast<acc>(eps), grads, coeffs);
    double p = activation_param_value;
    dispatch_activation(activation, p, [&](auto act) {
      const InputGradOp<T, decltype(act)::value> op{static_cast<const T*>(y), static_cast<const T*>(dy),
                                                    static_cast<T*>(dx), coeffs, activation_param<acc>(p)};
      launch_elementwise<T>(ctx, op, layout, {y, dy, dx});
    });
  });
}

}  // namespace

void backward_reduce(const LaunchContext& ctx, DType dtype, const void* y, const void* dy, const ChannelLayout& layout,
                     ChannelVector weight, ChannelVector bias, double eps, Activation activation,
                     double activation_param_value, void* sum_dz, void* sum_dz_xhat) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    double p = activation_param_value;
    dispatch_activation(activation, p, [&](auto act) {
      const GradientSumsOp<T, decltype(act)::value> op{static_cast<const T*>(y),
                                                        static_cast<const T*>(dy),
                                                        weight,
                                                        bias,
                                                        static_cast<acc>(eps),
                                                        activation_param<acc>(p),
                                                        static_cast<acc*>(sum_dz),
                                                        static_cast<acc*>(sum_dz_xhat)};
      launch_reduction<T>(ctx, op, layout, {y, dy});
    });
  });
}

void backward_input(const LaunchContext& ctx, DType dtype, const void* y, const void* dy, void* dx,
                    const ChannelLayout& layout, ChannelVector var, ChannelVector weight, ChannelVector bias,
                    ChannelVector sum_dz, ChannelVector sum_dz_xhat, int64_t count, double eps,
                    Activation activation, double activation_param_value) {
  input_grad_with(ctx, dtype, y, dy, dx, layout, var, weight, bias, sum_dz, sum_dz_xhat, count, eps, activation,
                  activation_param_value, ParamGrads{});
}

void train_backward(const LaunchContext& ctx, DType dtype, const void* y, const void* dy, void* dx,
                    const ChannelLayout& layout, ChannelVector var, ChannelVector weight, ChannelVector bias,
                    double eps, Activation activation, double activation_param_value, ChannelOutput dweight,
                    ChannelOutput dbias) {
  if (layout.C == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using acc = acc_type<decltype(tag)>;
    auto* sums = static_cast<acc*>(ctx.workspace(2 * int64_t(sizeof(acc)) * layout.C));
    backward_reduce(ctx, dtype, y, dy, layout, weight, bias, eps, activation, activation_param_value, sums,
                    sums + layout.C);
    const int64_t count = layout.N * layout.S;
    const DType acc_dtype = accumulate_dtype<acc>();
    input_grad_with(ctx, dtype, y, dy, dx, layout, var, weight, bias, {sums, 1, acc_dtype},
                    {sums + layout.C, 1, acc_dtype}, count > 0 ? count : 1, eps, activation, activation_param_value,
                    ParamGrads{dweight, dbias});
  });
}

}  // namespace inplace_abn::cuda
