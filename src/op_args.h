// Argument parsing and checks shared by the CPU and CUDA operator entry points.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include "abn_math.h"
#include "check.h"

namespace inplace_abn {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline bool is_supported_float(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}

// Calls f(T{}) with T the C++ type of `dtype` (float, double, Half, BFloat16), so kernels are
// instantiated per dtype (a plain switch: lambda bodies with commas break the dispatch macros).
template <typename F>
void dispatch_float_type(ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case ScalarType::Float:
      return f(float{});
    case ScalarType::Double:
      return f(double{});
    case ScalarType::Half:
      return f(torch::headeronly::Half{});
    case ScalarType::BFloat16:
      return f(torch::headeronly::BFloat16{});
    default:
      ABN_CHECK(false, op, ": unsupported dtype ", torch::headeronly::toString(dtype),
                      ", expected float32, float64, float16 or bfloat16");
  }
}

// Calls f(std::integral_constant<Activation, a>{}) so kernels are instantiated per activation.
template <typename F>
void dispatch_activation(Activation a, const F& f) {
  switch (a) {
    case Activation::Identity:
      return f(std::integral_constant<Activation, Activation::Identity>{});
    case Activation::LeakyRelu:
      return f(std::integral_constant<Activation, Activation::LeakyRelu>{});
    case Activation::Elu:
      return f(std::integral_constant<Activation, Activation::Elu>{});
    case Activation::Relu:
      return f(std::integral_constant<Activation, Activation::Relu>{});
  }
}

// Native activation names. "relu" (leaky_relu with slope 0, elu with alpha 0) is the one
// non-invertible case: its backward takes the pre-activation instead of the output.
inline Activation parse_activation(const std::string& name, double param) {
  ABN_CHECK(param >= 0.0, "activation_param must be >= 0, got ", param);
  if (name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::Relu;
  if (name == "leaky_relu" || name == "elu") {
    ABN_CHECK(param > 0.0, name, " with activation_param=0 is not invertible; use activation 'relu'");
    return name == "elu" ? Activation::Elu : Activation::LeakyRelu;
  }
  ABN_CHECK(false, "unknown activation '", name, "', expected one of identity, leaky_relu, elu, relu");
  return Activation::Identity;
}

template <typename acc>
ActivationParam<acc> make_activation_param(double p) {
  return {static_cast<acc>(p), p > 0.0 ? static_cast<acc>(1.0 / p) : acc(0)};
}

// A per-channel vector: 1-D, `channels` elements, a supported float dtype, on `x`'s device.
inline void check_channel_vector(const std::optional<Tensor>& v, const char* name, int64_t channels,
                                 const Tensor& x) {
  if (!v.has_value()) return;
  ABN_CHECK(v->dim() == 1 && v->size(0) == channels, name, " must have shape (", channels,
                  ",) to match the input's channel dimension");
  ABN_CHECK(is_supported_float(v->scalar_type()), name, " must be a float tensor");
  ABN_CHECK(v->get_device_index() == x.get_device_index() && v->is_cpu() == x.is_cpu() &&
                      v->is_cuda() == x.is_cuda(),
                  name, " must be on the input's device");
}

inline void check_input(const Tensor& x, const char* name) {
  ABN_CHECK(x.dim() >= 2, name, " must have shape (N, C, *) with at least 2 dimensions, got ", x.dim());
  ABN_CHECK(is_supported_float(x.scalar_type()), name,
                  " must be float32, float64, float16 or bfloat16");
}

}  // namespace inplace_abn
