// CUDA implementations of the operators of ops.cpp: the same argument checks as the CPU entry
// points (tensor_args.h), allocation of outputs and workspaces through torch (its caching allocator,
// on the current stream), a device guard, and torch's current stream for the kernels (kernels.h).
// Per-channel coefficients are computed on the device: no GPU vector is ever copied to the host.
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>  // aoti_torch_get_current_cuda_stream (USE_CUDA)
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "../tensor_args.h"
#include "kernels.h"

namespace inplace_abn::cuda_ops {
namespace {

using cuda::ChannelVector;
using cuda::LaunchContext;

// Sets the tensor's device for the call and collects the workspaces the kernels ask for; they stay
// alive until the operator returns, and the caching allocator orders their reuse on the stream.
class Launch {
 public:
  explicit Launch(const Tensor& like) : guard_(like.get_device_index()), like_(like) {
    void* stream = nullptr;
    ABN_CHECK(aoti_torch_get_current_cuda_stream(like.get_device_index(), &stream) == AOTI_TORCH_SUCCESS,
              "cannot get torch's current CUDA stream");
    context_ = LaunchContext{like.get_device_index(), stream, [this](int64_t bytes) {
                               workspaces_.push_back(
                                   torch::stable::new_empty(like_, {bytes}, torch::headeronly::ScalarType::Byte));
                               return workspaces_.back().mutable_data_ptr();
                             }};
  }
  Launch(const Launch&) = delete;
  Launch& operator=(const Launch&) = delete;
  const LaunchContext& context() const {
    return context_;
  }

 private:
  torch::stable::accelerator::DeviceGuard guard_;
  const Tensor& like_;
  LaunchContext context_;
  std::vector<Tensor> workspaces_;
};

ChannelVector channel_vector(const std::optional<Tensor>& t) {
  if (!t.has_value()) return {};
  return {t->const_data_ptr(), t->stride(0), dtype_of(*t, "per-channel vector")};
}

ChannelVector channel_vector(const Tensor& t) {
  return channel_vector(std::optional<Tensor>(t));
}

cuda::ChannelOutput channel_output(const std::optional<Tensor>& t) {
  if (!t.has_value()) return {};
  return {t->mutable_data_ptr(), t->stride(0), dtype_of(*t, "per-channel vector")};
}

std::tuple<Tensor, Tensor> statistics(const Tensor& x) {
  const auto [dtype, l, act] = check_statistics(x, x.is_cuda());
  Tensor mean = torch::stable::new_empty(x, {l.C}, accumulate_scalar_type(x));
  Tensor var = torch::stable::new_empty(x, {l.C}, accumulate_scalar_type(x));
  Launch launch(x);
  cuda::statistics(launch.context(), dtype, x.const_data_ptr(), l, mean.mutable_data_ptr(), var.mutable_data_ptr());
  return {mean, var};
}

void normalize_act_(const Tensor& x, const Tensor& mean, const Tensor& var, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, double eps, const std::string& activation,
                    double activation_param, const std::optional<Tensor>& preact) {
  const auto [dtype, l, act] =
      check_normalize_act(x, mean, var, weight, bias, activation, activation_param, preact, x.is_cuda());
  Launch launch(x);
  cuda::normalize_act(launch.context(), dtype, x.mutable_data_ptr(),
                      preact.has_value() ? preact->mutable_data_ptr() : nullptr, l, channel_vector(mean),
                      channel_vector(var), channel_vector(weight), channel_vector(bias), eps, act, activation_param);
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& y, const Tensor& dy, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias, double eps,
                                           const std::string& activation, double activation_param) {
  const auto [dtype, l, act] =
      check_backward_reduce(y, dy, weight, bias, activation, activation_param, y.is_cuda());
  Tensor sum_dz = torch::stable::new_empty(y, {l.C}, accumulate_scalar_type(y));
  Tensor sum_dz_xhat = torch::stable::new_empty(y, {l.C}, accumulate_scalar_type(y));
  Launch launch(y);
  cuda::backward_reduce(launch.context(), dtype, y.const_data_ptr(), dy.const_data_ptr(), l, channel_vector(weight),
                        channel_vector(bias), eps, act, activation_param, sum_dz.mutable_data_ptr(),
                        sum_dz_xhat.mutable_data_ptr());
  return {sum_dz, sum_dz_xhat};
}

Tensor backward_input(const Tensor& y, const Tensor& dy, const Tensor& var, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, const std::optional<Tensor>& sum_dz,
                      const std::optional<Tensor>& sum_dz_xhat, int64_t count, double eps,
                      const std::string& activation, double activation_param) {
  const auto [dtype, l, act] = check_backward_input(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, activation,
                                                     activation_param, y.is_cuda());
  Tensor dx = torch::stable::empty_like(y);
  check_same_geometry(y, "y", dx, "dx");
  Launch launch(y);
  cuda::backward_input(launch.context(), dtype, y.const_data_ptr(), dy.const_data_ptr(), dx.mutable_data_ptr(), l,
                       channel_vector(var), channel_vector(weight), channel_vector(bias), channel_vector(sum_dz),
                       channel_vector(sum_dz_xhat), count, eps, act, activation_param);
  return dx;
}

Tensor train_forward_(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                      const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
                      double momentum, double eps, const std::string& activation, double activation_param,
                      const std::optional<Tensor>& preact) {
  const auto [dtype, l, act] = check_train_forward(x, weight, bias, running_mean, running_var, momentum, eps,
                                                   activation, activation_param, preact, x.is_cuda());
  Tensor var = torch::stable::new_empty(x, {l.C}, accumulate_scalar_type(x));
  Launch launch(x);
  cuda::train_forward(launch.context(), dtype, x.mutable_data_ptr(),
                      preact.has_value() ? preact->mutable_data_ptr() : nullptr, l, channel_vector(weight),
                      channel_vector(bias), channel_output(running_mean), channel_output(running_var), momentum, eps,
                      act, activation_param, var.mutable_data_ptr());
  return var;
}

std::tuple<Tensor, Tensor, Tensor> train_backward(const Tensor& y, const Tensor& dy, const Tensor& var,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, double eps,
                                                  const std::string& activation, double activation_param) {
  const auto [dtype, l, act] =
      check_backward_reduce(y, dy, weight, bias, activation, activation_param, y.is_cuda());
  check_channel_vector(var, "var", l.C, y);
  Tensor dx = torch::stable::empty_like(y);
  check_same_geometry(y, "y", dx, "dx");
  // As the CPU operator: dweight / dbias in the parameters' dtypes (the accumulate type without them).
  Tensor dweight =
      torch::stable::new_empty(y, {l.C}, weight.has_value() ? weight->scalar_type() : accumulate_scalar_type(y));
  Tensor dbias = torch::stable::new_empty(y, {l.C}, bias.has_value() ? bias->scalar_type() : accumulate_scalar_type(y));
  Launch launch(y);
  cuda::train_backward(launch.context(), dtype, y.const_data_ptr(), dy.const_data_ptr(), dx.mutable_data_ptr(), l,
                       channel_vector(var), channel_vector(weight), channel_vector(bias), eps, act, activation_param,
                       channel_output(dweight), channel_output(dbias));
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace inplace_abn::cuda_ops

STABLE_TORCH_LIBRARY_IMPL(inplace_abn, CUDA, m) {
  m.impl("statistics", TORCH_BOX(&inplace_abn::cuda_ops::statistics));
  m.impl("normalize_act_", TORCH_BOX(&inplace_abn::cuda_ops::normalize_act_));
  m.impl("backward_reduce", TORCH_BOX(&inplace_abn::cuda_ops::backward_reduce));
  m.impl("backward_input", TORCH_BOX(&inplace_abn::cuda_ops::backward_input));
  m.impl("train_forward_", TORCH_BOX(&inplace_abn::cuda_ops::train_forward_));
  m.impl("train_backward", TORCH_BOX(&inplace_abn::cuda_ops::train_backward));
}
