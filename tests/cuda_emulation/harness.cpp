// The CUDA kernels' entry points (src/cuda/kernels.h) run by the CPU emulator, behind a C interface
// for ctypes (tests/test_cuda_emulation.py). Pointers are host memory. Each function returns null on
// success, else the error message.
#include <stdexcept>

#include "emulator.h"

#include "../../src/cuda/backward.cu"
#include "../../src/cuda/forward.cu"

using inplace_abn::Activation;
using inplace_abn::ChannelLayout;
using inplace_abn::DType;
using inplace_abn::cuda::ChannelOutput;
using inplace_abn::cuda::ChannelVector;
using inplace_abn::cuda::LaunchContext;

namespace {

thread_local std::string last_error;

// Runs f with a context whose workspaces live until f returns.
template <typename F>
const char* guarded(const F& f) {
  std::vector<std::unique_ptr<double[]>> workspaces;
  const LaunchContext ctx{0, nullptr, [&](int64_t bytes) {
                            workspaces.emplace_back(new double[(bytes + 7) / 8 + 1]);
                            return static_cast<void*>(workspaces.back().get());
                          }};
  try {
    f(ctx);
    return nullptr;
  } catch (const std::exception& e) {
    last_error = e.what();
    return last_error.c_str();
  }
}

}  // namespace

extern "C" {

void emu_set_wave(int64_t blocks) {
  emu::wave_blocks = blocks;
}

// order: 0 launch order, 1 reversed, 2 shuffled (threads between barriers, and blocks) with `seed`.
void emu_configure(int order, uint64_t seed, int poison_shared, int check_alignment) {
  emu::configure(emu::Order(order), seed, poison_shared != 0, check_alignment != 0);
}

const char* emu_statistics(int dtype, const void* x, const ChannelLayout* layout, void* mean, void* var) {
  return guarded([&](const LaunchContext& ctx) {
    inplace_abn::cuda::statistics(ctx, DType(dtype), x, *layout, mean, var);
  });
}

const char* emu_normalize_act(int dtype, void* x, void* preact, const ChannelLayout* layout, const ChannelVector* mean,
                              const ChannelVector* var, const ChannelVector* weight, const ChannelVector* bias,
                              double eps, int activation, double param) {
  return guarded([&](const LaunchContext& ctx) {
    inplace_abn::cuda::normalize_act(ctx, DType(dtype), x, preact, *layout, *mean, *var, *weight, *bias, eps,
                                     Activation(activation), param);
  });
}

const char* emu_backward_reduce(int dtype, const void* y, const void* dy, const ChannelLayout* layout,
                                const ChannelVector* weight, const ChannelVector* bias, double eps, int activation,
                                double param, void* sum_dz, void* sum_dz_xhat) {
  return guarded([&](const LaunchContext& ctx) {
    inplace_abn::cuda::backward_reduce(ctx, DType(dtype), y, dy, *layout, *weight, *bias, eps, Activation(activation),
                                       param, sum_dz, sum_dz_xhat);
  });
}

const char* emu_backward_input(int dtype, const void* y, const void* dy, void* dx, const ChannelLayout* layout,
                               const ChannelVector* var, const ChannelVector* weight, const ChannelVector* bias,
                               const ChannelVector* sum_dz, const ChannelVector* sum_dz_xhat, int64_t count, double eps,
                               int activation, double param) {
  return guarded([&](const LaunchContext& ctx) {
    inplace_abn::cuda::backward_input(ctx, DType(dtype), y, dy, dx, *layout, *var, *weight, *bias, *sum_dz,
                                      *sum_dz_xhat, count, eps, Activation(activation), param);
  });
}

const char* emu_train_forward(int dtype, void* x, void* preact, const ChannelLayout* layout, const ChannelVector* weight,
                              const ChannelVector* bias, const ChannelOutput* running_mean,
                              const ChannelOutput* running_var, double momentum, double eps, int activation,
                              double param, void* var) {
  return guarded([&](const LaunchContext& ctx) {
    inplace_abn::cuda::train_forward(ctx, DType(dtype), x, preact, *layout, *weight, *bias, *running_mean,
                                     *running_var, momentum, eps, Activation(activation), param, var);
  });
}

const char* emu_train_backward(int dtype, const void* y, const void* dy, void* dx, const ChannelLayout* layout,
                               const ChannelVector* var, const ChannelVector* weight, const ChannelVector* bias,
                               double eps, int activation, double param, const ChannelOutput* dweight,
                               const ChannelOutput* dbias) {
  return guarded([&](const LaunchContext& ctx) {
    inplace_abn::cuda::train_backward(ctx, DType(dtype), y, dy, dx, *layout, *var, *weight, *bias, eps,
                                      Activation(activation), param, *dweight, *dbias);
  });
}

}  // extern "C"
