// Runs the CUDA kernels of src/cuda on the CPU, for testing them on machines without a GPU: the
// sources are compiled as C++ by the host compiler; the threads of a block are fibers (ucontext)
// on the calling thread, __syncthreads() and warp shuffles are barriers between them, __shared__
// variables are statics (blocks run one after another), and "device memory" is host memory. It
// checks the index arithmetic, the work split, the vector paths and the reductions; not timing,
// nor the GPU memory model.
//
// To make ordering and alignment bugs show up on the CPU (configure()):
// - the threads of a block run, between two barriers, in a fixed, reversed or freshly shuffled
//   order (a read of another thread's write without a barrier in between then sees the old value);
// - blocks run in launch order, reversed or shuffled, and shared memory is filled with 0xff bytes
//   (NaN as floats, -1 as integers) before each block, so reading shared memory that the block did
//   not write (a missing initialization, another block's leftovers) gives NaN;
// - every 16-byte (8-, 4-byte) vector access asserts that it is aligned to its size;
// - the blocks per wave that resident_blocks() reports can be any number (132 SMs x occupancy for
//   an H100, 142 for an H200, 170 for a B200), so the work splits are those of real GPUs.
// What it cannot catch: races between blocks of one kernel that run at the same time on a GPU
// (blocks run one after another here), anything that depends on the memory model (fences,
// visibility without a barrier inside a warp on Volta+, whose lanes run independently), timing and
// resource limits (registers, shared memory size: scripts/cuda_resources.py checks those), and
// device-side faults other than misalignment (an out-of-bounds read of host memory usually goes
// unnoticed: the tests poison outputs and the GPU tests run compute-sanitizer).
//
// Include it before the .cu files (see harness.cpp). POSIX (ucontext) and C++17.
#pragma once

#define ABN_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
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

enum class Order : int { Fixed = 0, Reversed = 1, Shuffled = 2 };

struct Config {
  Order order = Order::Shuffled;
  uint64_t seed = 1;
  bool poison_shared = true;
  bool check_alignment = true;
};

inline Config config;
inline std::mt19937_64 random_engine(1);

inline void configure(Order order, uint64_t seed, bool poison_shared, bool check_alignment) {
  config = {order, seed, poison_shared, check_alignment};
  random_engine.seed(seed);
}

// order[0..n): 0..n-1 permuted as configured.
inline void arrange(std::vector<unsigned>& order, unsigned n) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0u);
  if (config.order == Order::Reversed) {
    std::reverse(order.begin(), order.end());
  } else if (config.order == Order::Shuffled) {
    std::shuffle(order.begin(), order.end(), random_engine);
  }
}

// "Shared memory": one buffer per declaration (ABN_SHARED_ARRAY in src/cuda/common.cuh; `site`
// identifies it), poisoned before each block.
inline std::map<const void*, std::vector<std::max_align_t>>& shared_buffers() {
  static std::map<const void*, std::vector<std::max_align_t>> buffers;
  return buffers;
}

inline void poison_shared() {
  for (auto& entry : shared_buffers()) std::memset(entry.second.data(), 0xff, entry.second.size() * sizeof(std::max_align_t));
}

template <typename T>
T* shared_array(std::size_t count, const void* site) {
  auto& buffer = shared_buffers()[site];
  const std::size_t words = (count * sizeof(T) + sizeof(std::max_align_t) - 1) / sizeof(std::max_align_t);
  if (buffer.size() < words) {
    buffer.resize(words);
    std::memset(buffer.data(), config.poison_shared ? 0xff : 0, words * sizeof(std::max_align_t));
  }
  return reinterpret_cast<T*>(buffer.data());
}

inline void expect_aligned(const void* p, std::size_t bytes) {
  if (config.check_alignment && reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    throw std::runtime_error("emulator: misaligned " + std::to_string(bytes) + "-byte access at address " +
                             std::to_string(reinterpret_cast<uintptr_t>(p)) + " (the GPU faults)");
  }
}

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
    if (config.poison_shared) poison_shared();
    unsigned live = threads;
    while (live > 0) {  // each round runs every live thread up to its next barrier
      live = 0;
      arrange(order_, threads);
      for (const unsigned t : order_) {
        current_ = t;
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
  std::vector<unsigned> order_;
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
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error("emulator: invalid grid (CUDA: x >= 1, 1 <= y, z <= 65535)");
  }
  std::vector<unsigned> order;
  arrange(order, grid.x * grid.y * grid.z);
  for (const unsigned b : order) {
    const uint3 index{b % grid.x, (b / grid.x) % grid.y, b / (grid.x * grid.y)};
    block().run(threads, [&](unsigned t) {
      block().context() = {uint3{t % block_dim.x, (t / block_dim.x) % block_dim.y, t / (block_dim.x * block_dim.y)},
                           index, block_dim, grid};
      kernel(args...);
    });
  }
}

}  // namespace emu

#define threadIdx (::emu::block().context().thread_idx)
#define blockIdx (::emu::block().context().block_idx)
#define blockDim (::emu::block().context().block_dim)
#define gridDim (::emu::block().context().grid_dim)
#undef __shared__
#define __shared__ static
#define ABN_SHARED_ARRAY(T, name, count) \
  T* const name = ::emu::shared_array<T>(count, [] { static const char site = 0; return &site; }())
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
