// Checks of operator arguments and their translation into the kernels' plain types, shared by the
// CPU and CUDA operator entry points (host code, built once).
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include <torch/csrc/stable/device.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include "check.h"
#include "types.h"

namespace inplace_abn {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The kernels' dtype of a tensor; fails unless it is float32, float64, float16 or bfloat16.
inline DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case ScalarType::Float:
      return DType::Float32;
    case ScalarType::Double:
      return DType::Float64;
    case ScalarType::Half:
      return DType::Float16;
    case ScalarType::BFloat16:
      return DType::BFloat16;
    default:
      ABN_CHECK(false, name, " must be float32, float64, float16 or bfloat16");
  }
  return DType::Float32;
}

// Statistics and backward sums are float64 for float64 tensors, float32 otherwise.
inline ScalarType accumulate_scalar_type(const Tensor& t) {
  return t.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
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

// Describes `t` (named `name` in errors) as (N, C, S). Fails with a clear message when the trailing
// dimensions cannot be walked with one stride, when neither the channels nor the trailing
// dimensions are contiguous, or when elements overlap; the Python layer routes such tensors
// through a contiguous copy first.
inline ChannelLayout channel_layout(const Tensor& t, const char* name) {
  const int64_t dim = t.dim();
  ABN_CHECK(dim >= 2, name, " must have shape (N, C, *) with at least 2 dimensions, got ", dim);
  ChannelLayout layout{};
  layout.N = t.size(0);
  layout.C = t.size(1);
  layout.stride_n = t.stride(0);
  layout.stride_c = t.stride(1);
  layout.S = 1;
  layout.stride_s = 1;
  int64_t expected_stride = -1;  // collapse the trailing dimensions (size-1 ones do not constrain)
  for (int64_t d = dim - 1; d >= 2; --d) {
    const int64_t size = t.size(d);
    if (size == 1) continue;
    if (expected_stride < 0) {
      layout.stride_s = t.stride(d);
    } else {
      ABN_CHECK(t.stride(d) == expected_stride, name,
                ": the dimensions after the channel dimension cannot be walked with one stride (make it contiguous)");
    }
    expected_stride = t.stride(d) * size;
    layout.S *= size;
  }
  for (int64_t d = 0; d < dim; ++d) {
    ABN_CHECK(t.size(d) <= 1 || t.stride(d) != 0, name,
              " has overlapping memory (an expanded tensor); pass a contiguous tensor");
  }
  const bool planes = layout.stride_s == 1 && (layout.S > 1 || layout.stride_c != 1);
  const bool rows = layout.stride_c == 1;
  ABN_CHECK(planes || rows, name, ": unsupported memory layout, expected contiguous or channels_last");
  layout.kind = planes ? ChannelLayout::Kind::Planes : ChannelLayout::Kind::Rows;
  return layout;
}

// Tensors read or written together must share sizes, strides and dtype, so one layout walks them all.
inline void check_same_geometry(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  ABN_CHECK(a.dim() == b.dim(), b_name, " must have the shape of ", a_name);
  for (int64_t d = 0; d < a.dim(); ++d) {
    ABN_CHECK(a.size(d) == b.size(d), b_name, " must have the shape of ", a_name, " (dimension ", d, ": ", b.size(d),
              " vs ", a.size(d), ")");
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    ABN_CHECK(a.size(d) <= 1 || a.stride(d) == b.stride(d), b_name, " must have the strides of ", a_name,
              " (dimension ", d, ")");
  }
  ABN_CHECK(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name);
  ABN_CHECK(a.device() == b.device(), b_name, " must be on the device of ", a_name);
}

// A per-channel vector: 1-D, `channels` elements, a supported float dtype, on `x`'s device.
inline void check_channel_vector(const std::optional<Tensor>& v, const char* name, int64_t channels, const Tensor& x) {
  if (!v.has_value()) return;
  ABN_CHECK(v->dim() == 1 && v->size(0) == channels, name, " must have shape (", channels,
            ",) to match the input's channel dimension");
  dtype_of(*v, name);
  ABN_CHECK(v->device() == x.device(), name, " must be on the input's device");
}

// What an operator's checked arguments tell its kernels.
struct OpArgs {
  DType dtype;
  ChannelLayout layout;
  Activation activation;
};

// The checks of each operator (ops.cpp), shared by the CPU and CUDA entry points; `device_ok`
// says whether the tensor is on the device of the kernels called.
inline OpArgs check_statistics(const Tensor& x, bool device_ok) {
  ABN_CHECK(device_ok, "the kernels were called with a tensor on another device");
  return {dtype_of(x, "x"), channel_layout(x, "x"), Activation::Identity};
}

inline OpArgs check_normalize_act(const Tensor& x, const Tensor& mean, const Tensor& var,
                                  const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                  const std::string& activation, double activation_param,
                                  const std::optional<Tensor>& preact, bool device_ok) {
  OpArgs args = check_statistics(x, device_ok);
  args.activation = parse_activation(activation, activation_param);
  check_channel_vector(mean, "mean", args.layout.C, x);
  check_channel_vector(var, "var", args.layout.C, x);
  check_channel_vector(weight, "weight", args.layout.C, x);
  check_channel_vector(bias, "bias", args.layout.C, x);
  ABN_CHECK(!preact.has_value() || args.activation == Activation::Relu,
            "preact is only written for activation 'relu' (the other activations are invertible)");
  if (preact.has_value()) check_same_geometry(x, "x", *preact, "preact");
  return args;
}

inline OpArgs check_backward_reduce(const Tensor& y, const Tensor& dy, const std::optional<Tensor>& weight,
                                    const std::optional<Tensor>& bias, const std::string& activation,
                                    double activation_param, bool device_ok) {
  ABN_CHECK(device_ok, "the kernels were called with a tensor on another device");
  const DType dtype = dtype_of(y, "y");
  check_same_geometry(y, "y", dy, "dy");
  const Activation act = parse_activation(activation, activation_param);
  const ChannelLayout layout = channel_layout(y, "y");
  check_channel_vector(weight, "weight", layout.C, y);
  check_channel_vector(bias, "bias", layout.C, y);
  return {dtype, layout, act};
}

inline OpArgs check_backward_input(const Tensor& y, const Tensor& dy, const Tensor& var,
                                   const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                                   const std::optional<Tensor>& sum_dz, const std::optional<Tensor>& sum_dz_xhat,
                                   int64_t count, const std::string& activation, double activation_param,
                                   bool device_ok) {
  const OpArgs args = check_backward_reduce(y, dy, weight, bias, activation, activation_param, device_ok);
  check_channel_vector(var, "var", args.layout.C, y);
  check_channel_vector(sum_dz, "sum_dz", args.layout.C, y);
  check_channel_vector(sum_dz_xhat, "sum_dz_xhat", args.layout.C, y);
  ABN_CHECK(sum_dz.has_value() == sum_dz_xhat.has_value(), "sum_dz and sum_dz_xhat must be given together");
  ABN_CHECK(!sum_dz.has_value() || count > 0, "count must be positive, got ", count);
  return args;
}

inline OpArgs check_train_forward(const Tensor& x, const std::optional<Tensor>& weight,
                                  const std::optional<Tensor>& bias, const std::optional<Tensor>& running_mean,
                                  const std::optional<Tensor>& running_var, double momentum, double eps,
                                  const std::string& activation, double activation_param,
                                  const std::optional<Tensor>& preact, bool device_ok) {
  OpArgs args = check_statistics(x, device_ok);
  args.activation = parse_activation(activation, activation_param);
  check_channel_vector(weight, "weight", args.layout.C, x);
  check_channel_vector(bias, "bias", args.layout.C, x);
  check_channel_vector(running_mean, "running_mean", args.layout.C, x);
  check_channel_vector(running_var, "running_var", args.layout.C, x);
  ABN_CHECK(running_mean.has_value() == running_var.has_value(),
            "running_mean and running_var must both be given or both be None");
  ABN_CHECK(eps > 0.0 && eps < std::numeric_limits<double>::infinity(), "eps must be a finite number > 0, got ", eps);
  ABN_CHECK(momentum == momentum && momentum > -std::numeric_limits<double>::infinity() &&
                momentum < std::numeric_limits<double>::infinity(),
            "momentum must be a finite number, got ", momentum);
  ABN_CHECK(args.layout.N * args.layout.S != 1,
            "training needs more than one value per channel to compute batch statistics, got 1");
  ABN_CHECK(!preact.has_value() || args.activation == Activation::Relu,
            "preact is only written for activation 'relu' (the other activations are invertible)");
  if (preact.has_value()) check_same_geometry(x, "x", *preact, "preact");
  return args;
}

}  // namespace inplace_abn
