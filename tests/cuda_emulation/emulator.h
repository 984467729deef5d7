// Runs the CUDA kernels of src/cuda on the CPU, for testing them on machines without a GPU: the
// sources are compiled as C++ by the host compiler; the threads of a block are fibers (ucontext)
// scheduled round-robin on the calling thread, __syncthreads() and warp shuffles are barriers
// between them, __shared__ variables are statics (blocks run one after another), and "device
// memory" is host memory. It checks the index arithmetic, the work split, the vector paths and the
// reductions; not timing, nor the GPU memory model.
//
// Include it before the .cu files (see harness.cpp). POSIX (ucontext) and C++17.
#pragma once

#define ABN_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <vector>

namespace emu {

struct ThreadContext {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};

struct Barrier {
  unsigned arrived = 0, generation = 0;
};

inline int64_t wave_blocks = 8;  // what resident_blocks() reports: small, so that work is split

// The block being run: one fiber per CUDA thread.
class Block {
 public:
  static constexpr unsigned kStack = 256 * 1024;

  // Runs body(t) for t in [0, threads) as fibers until all have returned.
  void run(unsigned threads, const std::function<void(unsigned)>& body) {
    threads_ = threads;
    body_ = &body;
    contexts_.assign(threads, {});
    fibers_.resize(threads);
    stacks_.resize(threads);
    done_.assign(threads, false);
    all_ = {};
    warps_.assign(threads / 32, {});
    exchange_.assign(threads, {});
    error_ = nullptr;
    for (unsigned t = 0; t < threads; ++t) {
      if (!stacks_[t]) stacks_[t].reset(new char[kStack]);
      getcontext(&fibers_[t]);
      fibers_[t].uc_stack.ss_sp = stacks_[t].get();
      fibers_[t].uc_stack.ss_size = kStack;
      fibers_[t].uc_link = &scheduler_;
      makecontext(&fibers_[t], reinterpret_cast<void (*)()>(&Block::entry), 0);
    }
    unsigned live = threads;
    while (live > 0) {
      live = 0;
      for (current_ = 0; current_ < threads; ++current_) {
        if (done_[current_]) continue;
        swapcontext(&scheduler_, &fibers_[current_]);
        live += done_[current_] ? 0 : 1;
      }
    }
    if (error_) std::rethrow_exception(error_);
  }

  ThreadContext& context() {
    return contexts_[current_];
  }
  unsigned current() const {
    return current_;
  }
  void yield() {
    swapcontext(&fibers_[current_], &scheduler_);
  }
  void wait(Barrier& b, unsigned participants) {
    const unsigned generation = b.generation;
    if (++b.arrived == participants) {
      b.arrived = 0;
      ++b.generation;
      return;
    }
    while (b.generation == generation) yield();
  }
  void sync_block() {
    wait(all_, threads_);
  }
  template <typename T>
  T shuffle_down(T value, int delta) {
    static_assert(sizeof(T) <= 8, "shuffled values have at most 8 bytes");
    const unsigned me = current_, lane = me % 32;
    std::memcpy(exchange_[me].data(), &value, sizeof(T));
    wait(warps_[me / 32], 32);
    T out = value;
    if (lane + delta < 32) std::memcpy(&out, exchange_[me + delta].data(), sizeof(T));
    wait(warps_[me / 32], 32);
    return out;
  }

 private:
  static void entry();

  unsigned threads_ = 0, current_ = 0;
  const std::function<void(unsigned)>* body_ = nullptr;
  ucontext_t scheduler_{};
  std::vector<ThreadContext> contexts_;
  std::vector<ucontext_t> fibers_;
  std::vector<std::unique_ptr<char[]>> stacks_;
  std::vector<bool> done_;
  Barrier all_;
  std::vector<Barrier> warps_;
  std::vector<std::array<unsigned char, 8>> exchange_;
  std::exception_ptr error_;
};

inline Block& block() {
  static Block instance;
  return instance;
}

inline void Block::entry() {
  Block& b = block();
  const unsigned me = b.current_;
  try {
    (*b.body_)(me);
  } catch (...) {
    b.error_ = std::current_exception();
  }
  b.done_[me] = true;  // returning resumes the scheduler (uc_link)
}

template <typename... Params, typename... Args>
void run(void (*kernel)(Params...), dim3 grid, dim3 block_dim, const Args&... args) {
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  if (threads % 32 != 0) throw std::runtime_error("emulator: blocks must be whole warps");
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block().run(threads, [&](unsigned t) {
          block().context() = {
              uint3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)},
              uint3{bx, by, bz}, block_dim, grid};
          kernel(args...);
        });
      }
    }
  }
}

}  // namespace emu

#define threadIdx (::emu::block().context().thread_idx)
#define blockIdx (::emu::block().context().block_idx)
#define blockDim (::emu::block().context().block_dim)
#define gridDim (::emu::block().context().grid_dim)
#undef __shared__
#define __shared__ static
#define __syncthreads() ::emu::block().sync_block()
#define __shfl_down_sync(mask, value, delta) ::emu::block().shuffle_down(value, delta)
#define __launch_bounds__(...)

#include "../../src/cuda/kernels.h"

namespace inplace_abn::cuda {

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, const LaunchContext&, const Args&... args) {
  emu::run(kernel, grid, block, static_cast<Params>(args)...);
}

template <typename... Params>
int64_t resident_blocks(void (*)(Params...), int) {
  return emu::wave_blocks;
}

}  // namespace inplace_abn::cuda
