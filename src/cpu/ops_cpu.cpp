// CPU implementations of the operators of ops.cpp: argument checks, allocation and the per-channel
// coefficients (abn_math.h) here; the element loops in kernels.cpp, compiled per instruction set,
// of which the best one the processor supports is used (INPLACE_ABN_CPU_ISA caps it: see select_kernels).
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "../abn_math.h"
#include "../tensor_args.h"
#include "kernels.h"

#if defined(ABN_HAVE_X86_ISAS) && defined(_MSC_VER)
#include <intrin.h>
#endif

namespace inplace_abn::cpu {

void run_parallel(int64_t count, int64_t grain, void (*chunk)(const void* body, int64_t begin, int64_t end),
                  const void* body) {
  torch::stable::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) { chunk(body, begin, end); });
}

namespace {

// The kernel builds from the portable one up, as indices into select_kernels' list.
enum Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

#if defined(ABN_HAVE_X86_ISAS)
// The best instruction set that both the processor and the operating system (it must save the wider
// registers on a context switch) support. avx2: AVX2, FMA, F16C; avx512: also AVX-512 F, CD, BW, DQ, VL.
Isa best_supported_isa() {
#if defined(_MSC_VER)
  int info[4];
  __cpuid(info, 0);
  if (info[0] < 7) return Baseline;
  __cpuid(info, 1);
  const unsigned ecx1 = static_cast<unsigned>(info[2]);
  const bool fma = ecx1 & (1u << 12), osxsave = ecx1 & (1u << 27), avx = ecx1 & (1u << 28), f16c = ecx1 & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return Baseline;
  const unsigned long long xcr0 = _xgetbv(0);
  if ((xcr0 & 0x6) != 0x6) return Baseline;  // XMM and YMM state
  __cpuidex(info, 7, 0);
  const unsigned ebx7 = static_cast<unsigned>(info[1]);
  if (!(ebx7 & (1u << 5))) return Baseline;
  const unsigned avx512_bits = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);  // F DQ CD BW VL
  const bool avx512 = (ebx7 & avx512_bits) == avx512_bits && (xcr0 & 0xe0) == 0xe0;  // opmask and ZMM state
  return avx512 ? Avx512 : Avx2;
#else
  __builtin_cpu_init();  // __builtin_cpu_supports also checks that the OS saves the registers
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) {
    return Baseline;
  }
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512vl");
  return avx512 ? Avx512 : Avx2;
#endif
}
#else
Isa best_supported_isa() {
  return Baseline;
}
#endif

// The best supported build, or a lower one named by INPLACE_ABN_CPU_ISA (a build's `isa` name; any other
// value is ignored, and `doctor` reports it). The tests run each build the processor supports.
const KernelTable& select_kernels() {
  const KernelTable* builds[] = {
      &baseline::kernels,
#if defined(ABN_HAVE_X86_ISAS)
      &avx2::kernels,
      &avx512::kernels,
#endif
  };
#if defined(_MSC_VER)
#pragma warning(push)
#pragma warning(disable : 4996)  // MSVC's "getenv may be unsafe": read once, nothing writes the environment
#endif
  const char* forced = std::getenv("INPLACE_ABN_CPU_ISA");
#if defined(_MSC_VER)
#pragma warning(pop)
#endif
  int level = best_supported_isa();
  for (int i = 0; forced != nullptr && i < level; ++i) {
    if (std::strcmp(forced, builds[i]->isa) == 0) level = i;
  }
  return *builds[level];
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

// Applies f(value&) to each element of a per-channel vector of any float dtype, in double.
template <typename F>
void update_channel_values(const Tensor& t, int64_t channels, const F& f) {
  const int64_t stride = t.stride(0);
  auto update = [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    for (int64_t c = 0; c < channels; ++c) {
      double value = static_cast<double>(p[c * stride]);
      f(c, value);
      // float and the 16-bit types round from float (Half / BFloat16 have no double constructor).
      if constexpr (std::is_same_v<T, double>) {
        p[c * stride] = value;
      } else {
        p[c * stride] = static_cast<T>(static_cast<float>(value));
      }
    }
  };
  switch (t.scalar_type()) {
    case ScalarType::Float:
      update(static_cast<float*>(t.mutable_data_ptr()));
      break;
    case ScalarType::Double:
      update(static_cast<double*>(t.mutable_data_ptr()));
      break;
    case ScalarType::Half:
      update(static_cast<torch::headeronly::Half*>(t.mutable_data_ptr()));
      break;
    default:
      update(static_cast<torch::headeronly::BFloat16*>(t.mutable_data_ptr()));
      break;
  }
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

// x <- act(s * (x - m) * invstd + b) in place, with per-channel m and v (accumulate type).
template <typename acc>
void normalize_with(const Tensor& x, const OpArgs& args, const acc* m, const acc* v,
                    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                    double activation_param, const std::optional<Tensor>& preact) {
  const ChannelLayout& l = args.layout;
  const acc e = static_cast<acc>(eps);
  const auto w = channel_values<acc>(weight, l.C, 1);
  const auto b = channel_values<acc>(bias, l.C, 0);
  // The kernels compute normalize() of abn_math.h, (x - mean) * scale + bias (see normalize_coeffs).
  std::vector<acc> mean(l.C), scale(l.C), shift(l.C);
  for (int64_t c = 0; c < l.C; ++c) {
    const auto k = normalize_coeffs(m[c], v[c], affine_scale(w[c], weight.has_value(), e), b[c], e);
    mean[c] = k.mean;
    scale[c] = k.scale;
    shift[c] = k.bias;
  }
  kernels().normalize_act(args.dtype, x.mutable_data_ptr(), preact.has_value() ? preact->mutable_data_ptr() : nullptr,
                          l, mean.data(), scale.data(), shift.data(), args.activation, activation_param);
}

void normalize_act_(const Tensor& x, const Tensor& mean, const Tensor& var, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, double eps, const std::string& activation,
                    double activation_param, const std::optional<Tensor>& preact) {
  const OpArgs args =
      check_normalize_act(x, mean, var, weight, bias, activation, activation_param, preact, x.is_cpu());
  with_accumulate_type(x, [&](auto tag) {
    using acc = decltype(tag);
    const auto m = channel_values<acc>(mean, args.layout.C, 0);
    const auto v = channel_values<acc>(var, args.layout.C, 1);
    normalize_with<acc>(x, args, m.data(), v.data(), weight, bias, eps, activation_param, preact);
  });
}

Tensor train_forward_(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                      double momentum, double eps, const std::string& activation, double activation_param,
                      const std::optional<Tensor>& preact) {
  const OpArgs args = check_train_forward(x, weight, bias, running_mean, running_var, momentum, eps, activation,
                                          activation_param, preact, x.is_cpu());
  const ChannelLayout& l = args.layout;
  Tensor var = torch::stable::new_empty(x, {l.C}, accumulate_scalar_type(x));
  with_accumulate_type(x, [&](auto tag) {
    using acc = decltype(tag);
    std::vector<acc> mean(l.C);
    acc* v = static_cast<acc*>(var.mutable_data_ptr());
    kernels().statistics(args.dtype, x.const_data_ptr(), l, mean.data(), v);
    const int64_t count = l.N * l.S;
    if (running_mean.has_value() && running_var.has_value() && count > 0) {
      const double unbias = unbias_factor(count);
      update_channel_values(*running_mean, l.C,
                            [&](int64_t c, double& r) { r = running_update(r, mean[c], momentum); });
      update_channel_values(*running_var, l.C,
                            [&](int64_t c, double& r) { r = running_update(r, v[c] * unbias, momentum); });
    }
    normalize_with<acc>(x, args, mean.data(), v, weight, bias, eps, activation_param, preact);
  });
  return var;
}

// sum(dz) and sum(dz * xhat) of each channel, in double; the per-channel bias and scale used; whether
// the reduction left z in the memory given for it.
template <typename acc>
struct Sums {
  std::vector<double> dz, dz_xhat;
  std::vector<acc> bias, scale;
  bool z_kept = false;
};

template <typename acc>
Sums<acc> reduce(const Tensor& y, const Tensor& dy, const OpArgs& args, const std::optional<Tensor>& weight,
                 const std::optional<Tensor>& bias, double eps, double activation_param, void* z_out = nullptr) {
  const ChannelLayout& l = args.layout;
  const acc e = static_cast<acc>(eps);
  Sums<acc> sums{std::vector<double>(l.C), std::vector<double>(l.C), channel_values<acc>(bias, l.C, 0),
                 channel_values<acc>(weight, l.C, 1)};
  sums.z_kept = kernels().backward_reduce(args.dtype, y.const_data_ptr(), dy.const_data_ptr(), z_out, l,
                                          sums.bias.data(), args.activation, activation_param, sums.dz.data(),
                                          sums.dz_xhat.data());
  for (int64_t c = 0; c < l.C; ++c) {
    sums.scale[c] = affine_scale(sums.scale[c], weight.has_value(), e);
    sums.dz_xhat[c] /= static_cast<double>(sums.scale[c]);  // xhat = (z - b) / s: divide the sum once
  }
  return sums;
}

// dx's memory, laid out like y (the kernels walk y, dy and dx with one layout).
Tensor new_input_grad(const Tensor& y) {
  Tensor dx = torch::stable::empty_like(y);
  check_same_geometry(y, "y", dx, "dx");
  return dx;
}

// dx (from new_input_grad, holding z if dx_holds_z) from the per-channel sums (training) or without
// them (sum_dz == nullptr: eval mode).
template <typename acc>
void input_grad_with(const Tensor& y, const Tensor& dy, Tensor& dx, bool dx_holds_z, const OpArgs& args, const acc* v,
                     const acc* s, const acc* b, const acc* sum_dz, const acc* sum_dz_xhat, int64_t count, double eps,
                     double activation_param) {
  const ChannelLayout& l = args.layout;
  const bool training = sum_dz != nullptr;
  std::vector<acc> dz_scale(l.C), centered_scale(l.C), offset(l.C);
  for (int64_t c = 0; c < l.C; ++c) {
    const auto k = input_grad_coeffs(v[c], s[c], b[c], static_cast<acc>(eps), training, training ? sum_dz[c] : acc(0),
                                     training ? sum_dz_xhat[c] : acc(0), static_cast<acc>(count));
    dz_scale[c] = k.dz_scale;
    centered_scale[c] = k.centered_scale;
    offset[c] = k.offset;
  }
  kernels().backward_input(args.dtype, y.const_data_ptr(), dy.const_data_ptr(), dx.mutable_data_ptr(), dx_holds_z, l,
                           dz_scale.data(), b, centered_scale.data(), offset.data(), args.activation,
                           activation_param);
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& y, const Tensor& dy, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias, double eps,
                                           const std::string& activation, double activation_param) {
  const OpArgs args = check_backward_reduce(y, dy, weight, bias, activation, activation_param, y.is_cpu());
  const int64_t C = args.layout.C;
  Tensor sum_dz = torch::stable::new_empty(y, {C}, accumulate_scalar_type(y));
  Tensor sum_dz_xhat = torch::stable::new_empty(y, {C}, accumulate_scalar_type(y));
  with_accumulate_type(y, [&](auto tag) {
    using acc = decltype(tag);
    const Sums<acc> sums = reduce<acc>(y, dy, args, weight, bias, eps, activation_param);
    acc* out_dz = static_cast<acc*>(sum_dz.mutable_data_ptr());
    acc* out_dz_xhat = static_cast<acc*>(sum_dz_xhat.mutable_data_ptr());
    for (int64_t c = 0; c < C; ++c) {
      out_dz[c] = static_cast<acc>(sums.dz[c]);
      out_dz_xhat[c] = static_cast<acc>(sums.dz_xhat[c]);
    }
  });
  return {sum_dz, sum_dz_xhat};
}

Tensor backward_input(const Tensor& y, const Tensor& dy, const Tensor& var, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, const std::optional<Tensor>& sum_dz,
                      const std::optional<Tensor>& sum_dz_xhat, int64_t count, double eps,
                      const std::string& activation, double activation_param) {
  const OpArgs args = check_backward_input(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, activation,
                                           activation_param, y.is_cpu());
  const int64_t C = args.layout.C;
  Tensor dx = new_input_grad(y);
  with_accumulate_type(y, [&](auto tag) {
    using acc = decltype(tag);
    const acc e = static_cast<acc>(eps);
    const auto v = channel_values<acc>(var, C, 1);
    auto s = channel_values<acc>(weight, C, 1);
    for (auto& value : s) value = affine_scale(value, weight.has_value(), e);
    const auto b = channel_values<acc>(bias, C, 0);
    const auto s1 = channel_values<acc>(sum_dz, C, 0);
    const auto s2 = channel_values<acc>(sum_dz_xhat, C, 0);
    const bool training = sum_dz.has_value();
    input_grad_with<acc>(y, dy, dx, false, args, v.data(), s.data(), b.data(), training ? s1.data() : nullptr,
                         s2.data(), count, eps, activation_param);
  });
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> train_backward(const Tensor& y, const Tensor& dy, const Tensor& var,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, double eps,
                                                  const std::string& activation, double activation_param) {
  const OpArgs args = check_backward_reduce(y, dy, weight, bias, activation, activation_param, y.is_cpu());
  const int64_t C = args.layout.C;
  check_channel_vector(var, "var", C, y);
  Tensor dx = new_input_grad(y), dweight, dbias;
  with_accumulate_type(y, [&](auto tag) {
    using acc = decltype(tag);
    // dx's memory lends itself to the reduction for z where keeping z pays (ELU: no second log).
    const Sums<acc> sums = reduce<acc>(y, dy, args, weight, bias, eps, activation_param, dx.mutable_data_ptr());
    const auto v = channel_values<acc>(var, C, 1);
    std::vector<acc> s1(C), s2(C);
    for (int64_t c = 0; c < C; ++c) {
      s1[c] = static_cast<acc>(sums.dz[c]);
      s2[c] = static_cast<acc>(sums.dz_xhat[c]);
    }
    const int64_t count = args.layout.N * args.layout.S;
    input_grad_with<acc>(y, dy, dx, sums.z_kept, args, v.data(), sums.scale.data(), sums.bias.data(), s1.data(),
                         s2.data(), count > 0 ? count : 1, eps, activation_param);
    // dweight = sign(w) * sum(dz * xhat), dbias = sum(dz).
    const auto w = channel_values<acc>(weight, C, 1);
    dweight = torch::stable::new_empty(y, {C}, weight.has_value() ? weight->scalar_type() : accumulate_scalar_type(y));
    update_channel_values(dweight, C, [&](int64_t c, double& out) { out = weight_grad<double>(w[c], sums.dz_xhat[c]); });
    dbias = torch::stable::new_empty(y, {C}, bias.has_value() ? bias->scalar_type() : accumulate_scalar_type(y));
    update_channel_values(dbias, C, [&](int64_t c, double& out) { out = sums.dz[c]; });
  });
  return {dx, dweight, dbias};
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
  m.impl("train_forward_", TORCH_BOX(&inplace_abn::cpu::train_forward_));
  m.impl("train_backward", TORCH_BOX(&inplace_abn::cpu::train_backward));
}

STABLE_TORCH_LIBRARY_IMPL(inplace_abn, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", TORCH_BOX(&inplace_abn::cpu::cpu_isa));
}
