// Operator schemas of the inplace_abn library; kernels are registered per device in cpu/ and cuda/.
//
// Tensors of shape (N, C, *) are reduced per channel over all other dimensions. Statistics and
// backward sums are float32 for float32/float16/bfloat16 inputs and float64 for float64 inputs.
// activation is one of identity, leaky_relu, elu, relu. relu is not invertible: when its gradient
// is needed, the forward writes the pre-activation into `preact` (optional, relu only) and the
// backward ops take that in place of y.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(inplace_abn, m) {
  // Per-channel mean and biased variance.
  m.def("statistics(Tensor x) -> (Tensor mean, Tensor var)");
  // x <- act((|w| + eps) * (x - mean) / sqrt(var + eps) + bias), in place.
  m.def(
      "normalize_act_(Tensor(a!) x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps, "
      "str activation, float activation_param, Tensor(b!)? preact) -> ()");
  // sum(dz) and sum(dz * xhat) per channel, from the output y (or the pre-activation for relu).
  m.def(
      "backward_reduce(Tensor y, Tensor dy, Tensor? weight, Tensor? bias, float eps, str activation, "
      "float activation_param) -> (Tensor sum_dz, Tensor sum_dz_xhat)");
  // Input gradient; without sum_dz / sum_dz_xhat the statistics are constants (eval mode).
  m.def(
      "backward_input(Tensor y, Tensor dy, Tensor var, Tensor? weight, Tensor? bias, Tensor? sum_dz, "
      "Tensor? sum_dz_xhat, int count, float eps, str activation, float activation_param) -> Tensor");
  // The unsynchronized training step in one call each (the synchronized variant composes the ops
  // above, all-reducing between them). Forward: batch statistics; running statistics (when given)
  // r <- r + momentum * (b - r) with the unbiased variance, left alone for an empty batch; then
  // normalize + activation in place. Returns the biased batch variance (accumulate type) for backward.
  m.def(
      "train_forward_(Tensor(a!) x, Tensor? weight, Tensor? bias, Tensor(b!)? running_mean, "
      "Tensor(c!)? running_var, float momentum, float eps, str activation, float activation_param, "
      "Tensor(d!)? preact) -> Tensor var");
  // Backward of train_forward_: both reductions and the input gradient. Returns (dx laid out like y,
  // dweight = sign(w) * sum(dz * xhat) in weight's dtype, dbias = sum(dz) in bias's dtype; the sums in
  // the accumulate type where weight / bias are absent).
  m.def(
      "train_backward(Tensor y, Tensor dy, Tensor var, Tensor? weight, Tensor? bias, float eps, str activation, "
      "float activation_param) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  // The instruction set of the CPU kernels in use ("avx512", "avx2" or "baseline").
  m.def("cpu_isa() -> str");
}
