// CPU kernels of In-Place ABN: one-pass statistics, in-place normalize + activate, and the two
// backward passes (reduction of sum(dz) and sum(dz * xhat); input gradient), each reading the
// tensor once. Tensors are walked as channel planes (NCHW) or channel rows (NHWC), see types.h;
// the per-element math lives in abn_math.h.
//
// Compiled once per instruction set (ABN_CPU_ISA: baseline, avx2); ops_cpu.cpp picks the best one
// the processor supports. The loops are written for the compiler to vectorize; all code here lives
// in the namespace of its instruction set (types.h explains why).
//
// Reductions are deterministic (the split into tasks depends on the shape only, never on the
// thread count): blocks of values are reduced in the accumulate type with independent partial sums
// held in registers, then folded in double.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>

#include "../abn_math.h"
#include "float16.h"
#include "kernels.h"

#ifndef ABN_CPU_ISA
#error "compile with -DABN_CPU_ISA=<namespace of this instruction set>"
#endif

namespace inplace_abn::cpu::ABN_CPU_ISA {
namespace {

constexpr int kLanes = 16;        // independent partial sums of a reduction along a contiguous run
constexpr int kRowGroup = 4;      // rows summed together into a per-channel accumulator
constexpr int64_t kBlock = 4096;  // values reduced in the accumulate type before folding in double
constexpr int64_t kGrain = 32768;    // values per parallel task, at least
constexpr int64_t kMinTasks = 64;    // reductions are split into at least this many tasks when possible

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename F>
void parallel_for(int64_t count, int64_t grain, const F& f) {
  if (count <= 0) return;
  run_parallel(
      count, std::max<int64_t>(grain, 1),
      [](const void* body, int64_t begin, int64_t end) { (*static_cast<const F*>(body))(begin, end); }, &f);
}

// A zero-initialized array owned by the kernel (scratch for partial results).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> data;
  explicit Scratch(int64_t n) : data(new T[static_cast<size_t>(std::max<int64_t>(n, 1))]()) {}
  T& operator[](int64_t i) {
    return data[i];
  }
};

// Sum of f(i) for i in [0, n), with kLanes independent partial sums.
template <typename acc, typename F>
inline acc lane_sum(int64_t n, const F& f) {
  acc lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += f(i + j);
  }
  acc tail = 0;
  for (; i < n; ++i) tail += f(i);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0] + tail;
}

// Two sums at once: f(i, a, b) adds its terms to a and b.
template <typename acc, typename F>
inline void lane_sum2(int64_t n, const F& f, acc& sum_a, acc& sum_b) {
  acc a[kLanes] = {}, b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) f(i + j, a[j], b[j]);
  }
  acc tail_a = 0, tail_b = 0;
  for (; i < n; ++i) f(i, tail_a, tail_b);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) {
      a[j] += a[j + width];
      b[j] += b[j + width];
    }
  }
  sum_a = a[0] + tail_a;
  sum_b = b[0] + tail_b;
}

// Walks the rows (n, s) of a Rows layout in order from a given row index.
struct RowCursor {
  const ChannelLayout* layout;
  int64_t n, s;
  RowCursor(const ChannelLayout& l, int64_t row) : layout(&l), n(row / l.S), s(row % l.S) {}
  int64_t offset() const {
    return n * layout->stride_n + s * layout->stride_s;
  }
  void next() {
    if (++s == layout->S) {
      s = 0;
      ++n;
    }
  }
};

// Calls f(offset) with the element offset of each of `count` rows from `first`.
template <typename F>
inline void for_rows(const ChannelLayout& l, int64_t first, int64_t count, const F& f) {
  RowCursor row(l, first);
  for (int64_t k = 0; k < count; ++k, row.next()) f(row.offset());
}

// Reductions over Planes: tasks are chunks of the planes, indexed (c, n, k) so that each channel's
// partial results are adjacent and merged in a fixed order.
struct PlaneChunks {
  int64_t per_plane, length, count;
  explicit PlaneChunks(const ChannelLayout& l) {
    const int64_t planes = l.N * l.C;
    const int64_t wanted = ceil_div(kMinTasks, std::max<int64_t>(planes, 1));
    const int64_t most = std::max<int64_t>(1, l.S / (kBlock / 2));
    length = std::max<int64_t>(1, ceil_div(l.S, std::min(wanted, most)));
    per_plane = ceil_div(l.S, length);
    count = planes * per_plane;
  }
  // Channel, offset of the first value and length of chunk i.
  void span(const ChannelLayout& l, int64_t i, int64_t& channel, int64_t& offset, int64_t& size) const {
    const int64_t k = i % per_plane, plane = i / per_plane;
    channel = plane / l.N;
    const int64_t start = k * length;
    offset = (plane % l.N) * l.stride_n + channel * l.stride_c + start;
    size = std::min(length, l.S - start);
  }
};

// Reductions over Rows: tasks are ranges of rows, each with per-channel accumulators in double.
// Within a range, blocks of about kBlock values (an L1-resident block, for a second pass) are
// reduced into per-channel accumulators of the accumulate type, kRowGroup rows at a time (fewer
// loads and stores of the accumulators), the loops running over channels so they vectorize.
struct RowRanges {
  int64_t rows, count, length, block_rows;
  explicit RowRanges(const ChannelLayout& l) {
    rows = l.N * l.S;
    count = std::clamp<int64_t>(ceil_div(l.N * l.C * l.S, kGrain), 1, kMinTasks);
    count = std::min(count, std::max<int64_t>(rows, 1));
    length = std::max<int64_t>(1, ceil_div(rows, count));
    count = ceil_div(rows, length);
    block_rows = kRowGroup * std::clamp<int64_t>(kBlock / kRowGroup / std::max<int64_t>(l.C, 1), 1, 64);
  }
  // Calls f(first_row, row_count) for the blocks of range r.
  template <typename F>
  void for_blocks(int64_t r, const F& f) const {
    const int64_t first = r * length, last = std::min(rows, first + length);
    for (int64_t block = first; block < last; block += block_rows) f(block, std::min(block_rows, last - block));
  }
};

// Calls group(o0, o1, o2, o3) with the element offsets of kRowGroup consecutive rows, then single(o)
// for the rows left over, over `count` rows from `first`.
template <typename Group, typename Single>
inline void for_row_groups(const ChannelLayout& l, int64_t first, int64_t count, const Group& group,
                           const Single& single) {
  RowCursor row(l, first);
  int64_t k = 0;
  for (; k + kRowGroup <= count; k += kRowGroup) {
    int64_t o[kRowGroup];
    for (int g = 0; g < kRowGroup; ++g, row.next()) o[g] = row.offset();
    group(o[0], o[1], o[2], o[3]);
  }
  for (; k < count; ++k, row.next()) single(row.offset());
}

// ---------------------------------------------------------------------------------------------
// Statistics: per-channel mean and biased variance, two passes over each L1-resident block merged
// with Chan's formula.

template <typename T>
void statistics_planes(const T* x, const ChannelLayout& l, Moments<double>* out) {
  using acc = acc_type<T>;
  const PlaneChunks chunks(l);
  Scratch<Moments<double>> partial(chunks.count);
  parallel_for(chunks.count, kGrain / chunks.length, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t channel, offset, size;
      chunks.span(l, i, channel, offset, size);
      Moments<double> m{0, 0, 0};
      for (int64_t start = 0; start < size; start += kBlock) {
        const T* p = x + offset + start;
        const int64_t n = std::min(kBlock, size - start);
        const acc mean = lane_sum<acc>(n, [&](int64_t j) { return to_acc(p[j]); }) / acc(n);
        const acc m2 = lane_sum<acc>(n, [&](int64_t j) {
          const acc d = to_acc(p[j]) - mean;
          return d * d;
        });
        m = merge_moments(m, Moments<double>{double(n), double(mean), double(m2)});
      }
      partial[i] = m;
    }
  });
  const int64_t per_channel = l.N * chunks.per_plane;
  for (int64_t c = 0; c < l.C; ++c) {
    out[c] = Moments<double>{0, 0, 0};
    for (int64_t j = c * per_channel; j < (c + 1) * per_channel; ++j) out[c] = merge_moments(out[c], partial[j]);
  }
}

template <typename T>
void statistics_rows(const T* x, const ChannelLayout& l, Moments<double>* out) {
  using acc = acc_type<T>;
  const int64_t C = l.C;
  const RowRanges ranges(l);
  Scratch<Moments<double>> partial(ranges.count * C);
  parallel_for(ranges.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc> scratch(3 * C);
    acc* __restrict sum = &scratch[0];
    acc* __restrict mean = sum + C;
    acc* __restrict m2 = mean + C;
    for (int64_t r = begin; r < end; ++r) {
      Moments<double>* range = &partial[r * C];
      ranges.for_blocks(r, [&](int64_t first, int64_t rows) {
        std::fill(sum, sum + C, acc(0));
        std::fill(m2, m2 + C, acc(0));
        for_row_groups(
            l, first, rows,
            [&](int64_t o0, int64_t o1, int64_t o2, int64_t o3) {
              const T *p0 = x + o0, *p1 = x + o1, *p2 = x + o2, *p3 = x + o3;
              for (int64_t c = 0; c < C; ++c) sum[c] += (to_acc(p0[c]) + to_acc(p1[c])) + (to_acc(p2[c]) + to_acc(p3[c]));
            },
            [&](int64_t o) {
              const T* p = x + o;
              for (int64_t c = 0; c < C; ++c) sum[c] += to_acc(p[c]);
            });
        for (int64_t c = 0; c < C; ++c) mean[c] = sum[c] / acc(rows);
        for_row_groups(
            l, first, rows,
            [&](int64_t o0, int64_t o1, int64_t o2, int64_t o3) {
              const T *p0 = x + o0, *p1 = x + o1, *p2 = x + o2, *p3 = x + o3;
              for (int64_t c = 0; c < C; ++c) {
                const acc d0 = to_acc(p0[c]) - mean[c], d1 = to_acc(p1[c]) - mean[c];
                const acc d2 = to_acc(p2[c]) - mean[c], d3 = to_acc(p3[c]) - mean[c];
                m2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
              }
            },
            [&](int64_t o) {
              const T* p = x + o;
              for (int64_t c = 0; c < C; ++c) {
                const acc d = to_acc(p[c]) - mean[c];
                m2[c] += d * d;
              }
            });
        for (int64_t c = 0; c < C; ++c) {
          range[c] = merge_moments(range[c], Moments<double>{double(rows), double(mean[c]), double(m2[c])});
        }
      });
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    out[c] = Moments<double>{0, 0, 0};
    for (int64_t r = 0; r < ranges.count; ++r) out[c] = merge_moments(out[c], partial[r * C + c]);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: x <- act(x * scale + shift) in place, optionally keeping the pre-activation.

template <typename T, Activation act, bool keep_preact>
void normalize_act_kernel(T* x, T* preact, const ChannelLayout& l, const acc_type<T>* scale, const acc_type<T>* shift,
                          ActivationParam<acc_type<T>> param) {
  using acc = acc_type<T>;
  using Ops = ActivationOps<act>;
  if (l.kind == ChannelLayout::Kind::Planes) {
    parallel_for(l.N * l.C, kGrain / std::max<int64_t>(l.S, 1), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % l.C;
        const int64_t offset = (plane / l.C) * l.stride_n + c * l.stride_c;
        T* p = x + offset;
        T* z = keep_preact ? preact + offset : nullptr;
        const acc a = scale[c], b = shift[c];
        for (int64_t s = 0; s < l.S; ++s) {
          const acc v = to_acc(p[s]) * a + b;
          if constexpr (keep_preact) z[s] = from_acc<T>(v);
          p[s] = from_acc<T>(Ops::forward(v, param));
        }
      }
    });
  } else {
    parallel_for(l.N * l.S, kGrain / std::max<int64_t>(l.C, 1), [&](int64_t begin, int64_t end) {
      for_rows(l, begin, end - begin, [&](int64_t offset) {
        T* p = x + offset;
        T* z = keep_preact ? preact + offset : nullptr;
        for (int64_t c = 0; c < l.C; ++c) {
          const acc v = to_acc(p[c]) * scale[c] + shift[c];
          if constexpr (keep_preact) z[c] = from_acc<T>(v);
          p[c] = from_acc<T>(Ops::forward(v, param));
        }
      });
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward reduction: sum(dz) and sum(dz * (z - b)) per channel, from the kept y and dy.

template <typename T, Activation act>
void backward_reduce_kernel(const T* y, const T* dy, const ChannelLayout& l, const acc_type<T>* bias,
                            ActivationParam<acc_type<T>> param, double* sum_dz, double* sum_dz_centered) {
  using acc = acc_type<T>;
  using Ops = ActivationOps<act>;
  for (int64_t c = 0; c < l.C; ++c) sum_dz[c] = sum_dz_centered[c] = 0;
  if (l.kind == ChannelLayout::Kind::Planes) {
    const PlaneChunks chunks(l);
    Scratch<double> partial(2 * chunks.count);
    parallel_for(chunks.count, kGrain / chunks.length, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t c, offset, size;
        chunks.span(l, i, c, offset, size);
        const acc b = bias[c];
        double total_dz = 0, total_centered = 0;
        for (int64_t start = 0; start < size; start += kBlock) {
          const T* py = y + offset + start;
          const T* pdy = dy + offset + start;
          acc block_dz, block_centered;
          lane_sum2<acc>(
              std::min(kBlock, size - start),
              [&](int64_t j, acc& s1, acc& s2) {
                acc z, dz;
                Ops::recover(to_acc(py[j]), to_acc(pdy[j]), param, z, dz);
                s1 += dz;
                s2 += dz * (z - b);
              },
              block_dz, block_centered);
          total_dz += block_dz;
          total_centered += block_centered;
        }
        partial[2 * i] = total_dz;
        partial[2 * i + 1] = total_centered;
      }
    });
    const int64_t per_channel = l.N * chunks.per_plane;
    for (int64_t c = 0; c < l.C; ++c) {
      for (int64_t j = c * per_channel; j < (c + 1) * per_channel; ++j) {
        sum_dz[c] += partial[2 * j];
        sum_dz_centered[c] += partial[2 * j + 1];
      }
    }
  } else {
    const int64_t C = l.C;
    const RowRanges ranges(l);
    Scratch<double> partial(2 * ranges.count * C);
    parallel_for(ranges.count, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc> scratch(2 * C);
      acc* __restrict s1 = &scratch[0];
      acc* __restrict s2 = s1 + C;
      for (int64_t r = begin; r < end; ++r) {
        double* range_dz = &partial[2 * r * C];
        double* range_centered = range_dz + C;
        ranges.for_blocks(r, [&](int64_t first, int64_t rows) {
          std::fill(s1, s1 + 2 * C, acc(0));
          for_row_groups(  // y and dy share strides
              l, first, rows,
              [&](int64_t o0, int64_t o1, int64_t o2, int64_t o3) {
                for (int64_t c = 0; c < C; ++c) {
                  acc z0, dz0, z1, dz1, z2, dz2, z3, dz3;
                  Ops::recover(to_acc(y[o0 + c]), to_acc(dy[o0 + c]), param, z0, dz0);
                  Ops::recover(to_acc(y[o1 + c]), to_acc(dy[o1 + c]), param, z1, dz1);
                  Ops::recover(to_acc(y[o2 + c]), to_acc(dy[o2 + c]), param, z2, dz2);
                  Ops::recover(to_acc(y[o3 + c]), to_acc(dy[o3 + c]), param, z3, dz3);
                  const acc b = bias[c];
                  s1[c] += (dz0 + dz1) + (dz2 + dz3);
                  s2[c] += (dz0 * (z0 - b) + dz1 * (z1 - b)) + (dz2 * (z2 - b) + dz3 * (z3 - b));
                }
              },
              [&](int64_t o) {
                for (int64_t c = 0; c < C; ++c) {
                  acc z, dz;
                  Ops::recover(to_acc(y[o + c]), to_acc(dy[o + c]), param, z, dz);
                  s1[c] += dz;
                  s2[c] += dz * (z - bias[c]);
                }
              });
          for (int64_t c = 0; c < C; ++c) {
            range_dz[c] += s1[c];
            range_centered[c] += s2[c];
          }
        });
      }
    });
    for (int64_t r = 0; r < ranges.count; ++r) {
      for (int64_t c = 0; c < C; ++c) {
        sum_dz[c] += partial[2 * r * C + c];
        sum_dz_centered[c] += partial[2 * r * C + C + c];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward input gradient: dx = dz_scale * dz + centered_scale * (z - b) + offset.

template <typename T, Activation act>
void backward_input_kernel(const T* y, const T* dy, T* dx, const ChannelLayout& l, const acc_type<T>* dz_scale,
                           const acc_type<T>* bias, const acc_type<T>* centered_scale, const acc_type<T>* offset,
                           ActivationParam<acc_type<T>> param) {
  using acc = acc_type<T>;
  using Ops = ActivationOps<act>;
  if (l.kind == ChannelLayout::Kind::Planes) {
    parallel_for(l.N * l.C, kGrain / std::max<int64_t>(l.S, 1), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % l.C;
        const int64_t at = (plane / l.C) * l.stride_n + c * l.stride_c;
        const T* py = y + at;
        const T* pdy = dy + at;
        T* pdx = dx + at;
        const InputGradCoeffs<acc> k{dz_scale[c], bias[c], centered_scale[c], offset[c]};
        for (int64_t s = 0; s < l.S; ++s) {
          acc z, dz;
          Ops::recover(to_acc(py[s]), to_acc(pdy[s]), param, z, dz);
          pdx[s] = from_acc<T>(input_grad(k, z, dz));
        }
      }
    });
  } else {
    parallel_for(l.N * l.S, kGrain / std::max<int64_t>(l.C, 1), [&](int64_t begin, int64_t end) {
      for_rows(l, begin, end - begin, [&](int64_t at) {
        const T* py = y + at;
        const T* pdy = dy + at;
        T* pdx = dx + at;
        for (int64_t c = 0; c < l.C; ++c) {
          acc z, dz;
          Ops::recover(to_acc(py[c]), to_acc(pdy[c]), param, z, dz);
          pdx[c] = from_acc<T>(input_grad(InputGradCoeffs<acc>{dz_scale[c], bias[c], centered_scale[c], offset[c]}, z, dz));
        }
      });
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch from the table's runtime arguments to the instantiations.

// Calls f(T{}) with T the storage type of `dtype`.
template <typename F>
void dispatch_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::Float32:
      return f(float{});
    case DType::Float64:
      return f(double{});
    case DType::Float16:
      return f(Float16{});
    case DType::BFloat16:
      return f(BFloat16{});
  }
}

// Calls f(std::integral_constant<Activation, a>{}).
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

template <typename acc>
ActivationParam<acc> activation_param(double p) {
  return {static_cast<acc>(p), p > 0.0 ? static_cast<acc>(1.0 / p) : acc(0)};
}

void statistics(DType dtype, const void* x, const ChannelLayout& layout, void* mean, void* var) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    Scratch<Moments<double>> moments(layout.C);
    const T* p = static_cast<const T*>(x);
    if (layout.kind == ChannelLayout::Kind::Planes) {
      statistics_planes(p, layout, &moments[0]);
    } else {
      statistics_rows(p, layout, &moments[0]);
    }
    for (int64_t c = 0; c < layout.C; ++c) {
      const Moments<double>& m = moments[c];
      static_cast<acc*>(mean)[c] = static_cast<acc>(m.mean);
      static_cast<acc*>(var)[c] = m.count > 0 ? static_cast<acc>(m.m2 / m.count) : acc(0);
    }
  });
}

void normalize_act(DType dtype, void* x, void* preact, const ChannelLayout& layout, const void* scale,
                   const void* shift, Activation activation, double activation_param_value) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    const auto param = activation_param<acc>(activation_param_value);
    const acc* a = static_cast<const acc*>(scale);
    const acc* b = static_cast<const acc*>(shift);
    dispatch_activation(activation, [&](auto act) {
      if (preact != nullptr) {
        normalize_act_kernel<T, decltype(act)::value, true>(static_cast<T*>(x), static_cast<T*>(preact), layout, a, b,
                                                             param);
      } else {
        normalize_act_kernel<T, decltype(act)::value, false>(static_cast<T*>(x), nullptr, layout, a, b, param);
      }
    });
  });
}

void backward_reduce(DType dtype, const void* y, const void* dy, const ChannelLayout& layout, const void* bias,
                     Activation activation, double activation_param_value, double* sum_dz, double* sum_dz_centered) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    dispatch_activation(activation, [&](auto act) {
      backward_reduce_kernel<T, decltype(act)::value>(static_cast<const T*>(y), static_cast<const T*>(dy), layout,
                                                      static_cast<const acc*>(bias),
                                                      activation_param<acc>(activation_param_value), sum_dz,
                                                      sum_dz_centered);
    });
  });
}

void backward_input(DType dtype, const void* y, const void* dy, void* dx, const ChannelLayout& layout,
                    const void* dz_scale, const void* bias, const void* centered_scale, const void* offset,
                    Activation activation, double activation_param_value) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    dispatch_activation(activation, [&](auto act) {
      backward_input_kernel<T, decltype(act)::value>(
          static_cast<const T*>(y), static_cast<const T*>(dy), static_cast<T*>(dx), layout,
          static_cast<const acc*>(dz_scale), static_cast<const acc*>(bias), static_cast<const acc*>(centered_scale),
          static_cast<const acc*>(offset), activation_param<acc>(activation_param_value));
    });
  });
}

#define ABN_STRINGIFY_(x) #x
#define ABN_STRINGIFY(x) ABN_STRINGIFY_(x)

}  // namespace

extern const KernelTable kernels;  // declared for every instruction set: external linkage
const KernelTable kernels = {ABN_STRINGIFY(ABN_CPU_ISA), &statistics, &normalize_act, &backward_reduce,
                             &backward_input};

}  // namespace inplace_abn::cpu::ABN_CPU_ISA
