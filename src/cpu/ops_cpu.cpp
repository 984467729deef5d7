// CPU implementations of the operators of ops.cpp: argument checks, allocation and the per-channel
// coefficients (abn_math.h) here; the element loops in kernels.cpp, compiled per instruction set,
// of which the best one the processor supports is used. INPLACE_ABN_CPU_ISA=baseline forces the
// portable build (the tests run both).
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "../abn_math.h"
#include "../tensor_args.h"
#include "kernels.h"

#if defined(ABN_HAVE_AVX2) && defined(_MSC_VER)
#include <intrin.h>
#endif

namespace inplace_abn::cpu {

void run_parallel(int64_t count, int64_t grain, void (*chunk)(const void* body, int64_t begin, int64_t end),
                  const void* body) {
  torch::stable::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) { chunk(body, begin, end); });
}

namespace {

#if defined(ABN_HAVE_AVX2)
bool has_avx2_fma_f16c() {
#if defined(_MSC_VER)
  int info[4];
  __cpuid(info, 0);
  if (info[0] < 7) return false;
  __cpuid(info, 1);
  const bool fma = info[2] & (1 << 12), osxsave = info[2] & (1 << 27), avx = info[2] & (1 << 28);
  const bool f16c = info[2] & (1 << 29);
  if (!(fma && osxsave && avx && f16c) || (_xgetbv(0) & 6) != 6) return false;  // the OS saves YMM registers
  __cpuidex(info, 7, 0);
  return info[1] & (1 << 5);
#else
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
}
#endif

const KernelTable& select_kernels() {
#if defined(ABN_HAVE_AVX2)
#if defined(_MSC_VER)
#pragma warning(push)
#pragma warning(disable : 4996)  // MSVC's "getenv may be unsafe": read once, nothing writes the environment
#endif
  const char* forced = std::getenv("INPLACE_ABN_CPU_ISA");
#if defined(_MSC_VER)
#pragma warning(pop)
#endif
  const bool baseline_forced = forced != nullptr && std::strcmp(forced, "baseline") == 0;
  if (!baseline_forced && has_avx2_fma_f16c()) return avx2::kernels;
#endif
  return baseline::kernels;
}

const KernelTable& kernels() {
  static const KernelTable& table = select_kernels();
  return table;
}

// A per-channel vector of any float dtype as `acc` values (`fallback` where absent).
template <typename acc>
std::vector<acc> channel_values(const std::optional<Tensor>& t, int64_t channels, acc fallback) {
  std::vector<acc> out(static_cast<size_t>(channels), fallback);
  if (!t.has_value()) return out;
  const int64_t stride = t->stride(0);
  auto read = [&](auto* p) {
    for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<acc>(p[c * stride]);
  };
  switch (t->scalar_type()) {
    case ScalarType::Float:
      read(t->const_data_ptr<float>());
      break;
    case ScalarType::Double:
      read(t->const_data_ptr<double>());
      break;
    case ScalarType::Half:
      read(t->const_data_ptr<torch::headeronly::Half>());
      break;
    default:
      read(t->const_data_ptr<torch::headeronly::BFloat16>());
      break;
  }
  return out;
}

// Calls f(acc{}) with the accumulate type of x: double for float64, float otherwise.
template <typename F>
void with_accumulate_type(const Tensor& x, const F& f) {
  if (x.scalar_type() == ScalarType::Double) {
    f(double{});
  } else {
    f(float{});
  }
}

std::tuple<Tensor, Tensor> statistics(const Tensor& x) {
  const auto [dtype, l, act] = check_statistics(x, x.is_cpu());
  Tensor mean = torch::stable::new_empty(x, {l.C}, accumulate_scalar_type(x));
  Tensor var = torch::stable::new_empty(x, {l.C}, accumulate_scalar_type(x));
  kernels().statistics(dtype, x.const_data_ptr(), l, mean.mutable_data_ptr(), var.mutable_data_ptr());
  return {mean, var};
}

void normalize_act_(const Tensor& x, const Tensor& mean, const Tensor& var, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, double eps, const std::string& activation,
                    double activation_param, const std::optional<Tensor>& preact) {
  const auto [dtype, l, act] =
      check_normalize_act(x, mean, var, weight, bias, activation, activation_param, preact, x.is_cpu());
  with_accumulate_type(x, [&](auto tag) {
    using acc = decltype(tag);
    const acc e = static_cast<acc>(eps);
    const auto m = channel_values<acc>(mean, l.C, 0);
    const auto v = channel_values<acc>(var, l.C, 1);
    const auto w = channel_values<acc>(weight, l.C, 1);
    const auto b = channel_values<acc>(bias, l.C, 0);
    std::vector<acc> scale(l.C), shift(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      const auto k = normalize_coeffs(m[c], v[c], affine_scale(w[c], weight.has_value(), e), b[c], e);
      scale[c] = k.scale;
      shift[c] = k.shift;
    }
    kernels().normalize_act(dtype, x.mutable_data_ptr(), preact.has_value() ? preact->mutable_data_ptr() : nullptr, l,
                            scale.data(), shift.data(), act, activation_param);
  });
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& y, const Tensor& dy, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias, double eps,
                                           const std::string& activation, double activation_param) {
  const auto [dtype, l, act] = check_backward_reduce(y, dy, weight, bias, activation, activation_param, y.is_cpu());
  Tensor sum_dz = torch::stable::new_empty(y, {l.C}, accumulate_scalar_type(y));
  Tensor sum_dz_xhat = torch::stable::new_empty(y, {l.C}, accumulate_scalar_type(y));
  with_accumulate_type(y, [&](auto tag) {
    using acc = decltype(tag);
    const acc e = static_cast<acc>(eps);
    const auto w = channel_values<acc>(weight, l.C, 1);
    const auto b = channel_values<acc>(bias, l.C, 0);
    std::vector<double> s1(l.C), s2(l.C);
    kernels().backward_reduce(dtype, y.const_data_ptr(), dy.const_data_ptr(), l, b.data(), act, activation_param,
                              s1.data(), s2.data());
    acc* out_dz = static_cast<acc*>(sum_dz.mutable_data_ptr());
    acc* out_dz_xhat = static_cast<acc*>(sum_dz_xhat.mutable_data_ptr());
    for (int64_t c = 0; c < l.C; ++c) {
      out_dz[c] = static_cast<acc>(s1[c]);  // xhat = (z - b) / s: divide the sum once
      out_dz_xhat[c] = static_cast<acc>(s2[c] / static_cast<double>(affine_scale(w[c], weight.has_value(), e)));
    }
  });
  return {sum_dz, sum_dz_xhat};
}

Tensor backward_input(const Tensor& y, const Tensor& dy, const Tensor& var, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, const std::optional<Tensor>& sum_dz,
                      const std::optional<Tensor>& sum_dz_xhat, int64_t count, double eps,
                      const std::string& activation, double activation_param) {
  const auto [dtype, l, act] = check_backward_input(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, activation,
                                                     activation_param, y.is_cpu());
  const bool training = sum_dz.has_value();
  Tensor dx = torch::stable::empty_like(y);
  check_same_geometry(y, "y", dx, "dx");
  with_accumulate_type(y, [&](auto tag) {
    using acc = decltype(tag);
    const acc e = static_cast<acc>(eps);
    const auto v = channel_values<acc>(var, l.C, 1);
    const auto w = channel_values<acc>(weight, l.C, 1);
    const auto b = channel_values<acc>(bias, l.C, 0);
    const auto s1 = channel_values<acc>(sum_dz, l.C, 0);
    const auto s2 = channel_values<acc>(sum_dz_xhat, l.C, 0);
    std::vector<acc> dz_scale(l.C), centered_scale(l.C), offset(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      const auto k = input_grad_coeffs(v[c], affine_scale(w[c], weight.has_value(), e), b[c], e, training, s1[c],
                                       s2[c], static_cast<acc>(count));
      dz_scale[c] = k.dz_scale;
      centered_scale[c] = k.centered_scale;
      offset[c] = k.offset;
    }
    kernels().backward_input(dtype, y.const_data_ptr(), dy.const_data_ptr(), dx.mutable_data_ptr(), l,
                             dz_scale.data(), b.data(), centered_scale.data(), offset.data(), act, activation_param);
  });
  return dx;
}

std::string cpu_isa() {
  return kernels().isa;
}

}  // namespace
}  // namespace inplace_abn::cpu

STABLE_TORCH_LIBRARY_IMPL(inplace_abn, CPU, m) {
  m.impl("statistics", TORCH_BOX(&inplace_abn::cpu::statistics));
  m.impl("normalize_act_", TORCH_BOX(&inplace_abn::cpu::normalize_act_));
  m.impl("backward_reduce", TORCH_BOX(&inplace_abn::cpu::backward_reduce));
  m.impl("backward_input", TORCH_BOX(&inplace_abn::cpu::backward_input));
}

STABLE_TORCH_LIBRARY_IMPL(inplace_abn, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&inplace_abn::cpu::cpu_isa));
}
