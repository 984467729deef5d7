// The CUDA kernels' interface: raw pointers, a ChannelLayout and per-channel vectors, no torch
// types, so that the .cu files compile without torch's headers (faster, and nvcc never sees them).
// The host side (ops_cuda.cpp) checks arguments, allocates outputs, sets the device and passes
// torch's current stream and a workspace allocator; the functions here only plan and launch.
#pragma once

#include <cstdint>
#include <functional>

#include "../types.h"

namespace inplace_abn::cuda {

// A per-channel vector of any float dtype on the device (data == nullptr: absent).
struct ChannelVector {
  const void* data = nullptr;
  int64_t stride = 0;
  DType dtype = DType::Float32;
};

// A per-channel vector of any float dtype that a kernel writes (data == nullptr: none to write).
struct ChannelOutput {
  void* data = nullptr;
  int64_t stride = 0;
  DType dtype = DType::Float32;
};

// Where and how to launch: the device (current when called), torch's current stream on it
// (a cudaStream_t), and device memory for partial results, valid until the call returns (torch's
// caching allocator orders its reuse on the stream).
struct LaunchContext {
  int device;
  void* stream;
  std::function<void*(int64_t bytes)> workspace;
};

// Per-channel outputs (mean, var, sum_dz, sum_dz_xhat) hold the accumulate type: double for
// Float64 tensors, float otherwise.

// Mean and biased variance of each channel.
void statistics(const LaunchContext& ctx, DType dtype, const void* x, const ChannelLayout& layout, void* mean,
                void* var);

// x <- act(s * (x - mean) * invstd + bias) in place; preact (laid out like x), when not null,
// receives the pre-activation.
void normalize_act(const LaunchContext& ctx, DType dtype, void* x, void* preact, const ChannelLayout& layout,
                   ChannelVector mean, ChannelVector var, ChannelVector weight, ChannelVector bias, double eps,
                   Activation activation, double activation_param);

// sum(dz) and sum(dz * xhat) of each channel; y and dy share a layout.
void backward_reduce(const LaunchContext& ctx, DType dtype, const void* y, const void* dy, const ChannelLayout& layout,
                     ChannelVector weight, ChannelVector bias, double eps, Activation activation,
                     double activation_param, void* sum_dz, void* sum_dz_xhat);

// Input gradient; without sum_dz / sum_dz_xhat (data == nullptr) the statistics are constants
// (eval mode). y, dy and dx share a layout.
void backward_input(const LaunchContext& ctx, DType dtype, const void* y, const void* dy, void* dx,
                    const ChannelLayout& layout, ChannelVector var, ChannelVector weight, ChannelVector bias,
                    ChannelVector sum_dz, ChannelVector sum_dz_xhat, int64_t count, double eps,
                    Activation activation, double activation_param);

// The unsynchronized training step in one call each (the host composes nothing):
// train_forward: statistics (var receives the biased variance), running statistics updated with
// momentum and the unbiased variance (abn_math.h's running_update; not for an empty batch), then
// normalize_act in place.
void train_forward(const LaunchContext& ctx, DType dtype, void* x, void* preact, const ChannelLayout& layout,
                   ChannelVector weight, ChannelVector bias, ChannelOutput running_mean, ChannelOutput running_var,
                   double momentum, double eps, Activation activation, double activation_param, void* var);

// train_backward: both reductions, the input gradient dx (laid out like y), dweight = sign(w) * S2
// and dbias = S1 (either output may be absent).
void train_backward(const LaunchContext& ctx, DType dtype, const void* y, const void* dy, void* dx,
                    const ChannelLayout& layout, ChannelVector var, ChannelVector weight, ChannelVector bias,
                    double eps, Activation activation, double activation_param, ChannelOutput dweight,
                    ChannelOutput dbias);

}  // namespace inplace_abn::cuda
