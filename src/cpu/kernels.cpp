// CPU kernels of In-Place ABN: one-pass statistics, in-place normalize + activate, and the two
// backward passes (reduction of sum(dz) and sum(dz * xhat); input gradient), each reading the
// tensor once. Tensors are walked as channel planes (NCHW) or channel rows (NHWC), see types.h;
// the per-element math lives in abn_math.h.
//
// Compiled once per instruction set (ABN_CPU_ISA: baseline, avx2, avx512); ops_cpu.cpp picks the best one
// the processor supports. The loops are written for the compiler to vectorize; all code here lives
// in the namespace of its instruction set (types.h explains why).
//
// Reductions are deterministic (the split into tasks depends on the shape only, never on the
// thread count): blocks of values are reduced in the accumulate type with independent partial sums
// held in registers, then folded in double.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
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

// Runs: `runs` runs of n values, run r starting at element r * stride (one plane, or the same
// channel's small planes in consecutive samples). Lane sums below add f(offset) over all of them,
// the partial sums carried across runs (one fold per call, not per run).
struct Runs {
  int64_t n, runs = 1, stride = 0;
  int64_t count() const {
    return n * runs;
  }
};

// Sum of f(offset) over the values of `r`, with kLanes independent partial sums.
template <typename acc, typename F>
inline acc lane_sum(Runs r, const F& f) {
  acc lanes[kLanes] = {};
  acc tail = 0;
  for (int64_t run = 0; run < r.runs; ++run) {
    const int64_t base = run * r.stride;
    int64_t i = 0;
    for (; i + kLanes <= r.n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) lanes[j] += f(base + i + j);
    }
    for (; i < r.n; ++i) tail += f(base + i);
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0] + tail;
}

// Two sums at once: f(offset, a, b) adds its terms to a and b, with W partial sums of each. GCC 12
// vectorizes the statistics' pair (deviations, squares) with W = 32 only: with 16 it vectorizes the
// outer loop, with shuffles, 4x slower.
template <int W, typename acc, typename F>
inline void lane_sum2(Runs r, const F& f, acc& sum_a, acc& sum_b) {
  acc a[W] = {}, b[W] = {};
  acc tail_a = 0, tail_b = 0;
  for (int64_t run = 0; run < r.runs; ++run) {
    const int64_t base = run * r.stride;
    int64_t i = 0;
    for (; i + W <= r.n; i += W) {
      for (int j = 0; j < W; ++j) f(base + i + j, a[j], b[j]);
    }
    for (; i < r.n; ++i) f(base + i, tail_a, tail_b);
  }
  for (int width = W / 2; width > 0; width /= 2) {
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

// Reductions over Planes: a task is a chunk of one plane, or, for planes smaller than half a block
// (7x7, 14x14), whole planes of one channel in consecutive samples, up to a block of values (the
// per-task work of folding lanes and merging partial results is then paid per block, not per
// plane). Tasks are indexed (c, group of samples, k) so that each channel's partial results are
// adjacent and merged in a fixed order; the split depends on the shape only.
struct PlaneChunks {
  int64_t per_plane, length, runs, groups, count;
  explicit PlaneChunks(const ChannelLayout& l) {
    const int64_t planes = l.N * l.C;
    const int64_t wanted = ceil_div(kMinTasks, std::max<int64_t>(planes, 1));
    const int64_t most = std::max<int64_t>(1, l.S / (kBlock / 2));
    length = std::max<int64_t>(1, ceil_div(l.S, std::min(wanted, most)));
    per_plane = ceil_div(l.S, length);
    // Planes per task: as many as fill a block, as long as kMinTasks tasks remain.
    const int64_t fill = std::min(kBlock / std::max<int64_t>(l.S, 1), planes / kMinTasks);
    runs = per_plane > 1 ? 1 : std::clamp<int64_t>(fill, 1, std::max<int64_t>(l.N, 1));
    groups = ceil_div(l.N, runs);
    count = l.C * groups * per_plane;
  }
  // Channel, offset of the first value and the runs of task i (its chunk of one plane, or its planes).
  void span(const ChannelLayout& l, int64_t i, int64_t& channel, int64_t& offset, Runs& r) const {
    const int64_t k = i % per_plane, unit = i / per_plane;
    channel = unit / groups;
    const int64_t first_sample = (unit % groups) * runs;
    const int64_t start = k * length;
    offset = first_sample * l.stride_n + channel * l.stride_c + start;
    r = Runs{std::min(length, l.S - start), std::min(runs, l.N - first_sample), l.stride_n};
  }
  int64_t per_channel() const {
    return groups * per_plane;
  }
  // Values per task, at most (the parallel grain is counted in values).
  int64_t task_values() const {
    return length * runs;
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
// Statistics: per-channel mean and biased variance. Each L1-resident block of values is reduced
// twice (shifted sum, then centred squares) in the accumulate type, relative to a shift taken from
// the data itself, so that a large mean costs no precision (x - shift is exact for nearby values);
// a block whose float sums overflow (values beyond ~1e17) is redone in double, so that statistics
// are finite wherever the double result is. The blocks are merged in double with Chan's formula
// (or with shifted sums of centred block moments: see flat_statistics).

// Moments of the n values of r (a run, or small planes of one channel) in A: an approximate mean c
// relative to the first value (x - shift is exact for values near it), then the deviations d = x - c
// and their squares (the corrected two-pass algorithm): mean = c + sum(d) / n, m2 = sum(d^2) - sum(d)^2 / n. The deviations are
// centred, so their sum carries far less rounding than the first pass's (whose terms all lean the
// way the shift lies from the mean): the mean of a channel whose mean is small against its spread
// keeps its relative precision.
template <typename A, typename T>
Moments<double> run_moments(const T* p, Runs r) {
  const int64_t n = r.count();
  const A shift = static_cast<A>(to_acc(p[0]));
  const A offset = lane_sum<A>(r, [&](int64_t j) { return static_cast<A>(to_acc(p[j])) - shift; }) / static_cast<A>(n);
  const A centre = shift + offset;
  A deviations, squares;
  lane_sum2<2 * kLanes>(
      r,
      [&](int64_t j, A& dev, A& sq) {
        const A d = static_cast<A>(to_acc(p[j])) - centre;
        dev += d;
        sq += d * d;
      },
      deviations, squares);
  const double correction = double(deviations) / double(n);
  return {double(n), double(centre) + correction, double(squares) - double(deviations) * correction};
}

template <typename T>
Moments<double> block_moments(const T* p, Runs r) {
  const Moments<double> m = run_moments<acc_type<T>>(p, r);
  if (std::isfinite(m.mean) && std::isfinite(m.m2)) return m;
  return run_moments<double>(p, r);  // overflowed in float (or non-finite data: then NaN / inf again)
}

template <typename T>
void statistics_planes(const T* x, const ChannelLayout& l, Moments<double>* out) {
  const PlaneChunks chunks(l);
  Scratch<Moments<double>> partial(chunks.count);
  parallel_for(chunks.count, kGrain / chunks.task_values(), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t channel, offset;
      Runs r;
      chunks.span(l, i, channel, offset, r);
      Moments<double> m{0, 0, 0};
      // Several runs only for small planes: then r.count() <= kBlock, one block.
      for (int64_t start = 0; start < r.n; start += kBlock) {
        m = merge_moments(m, block_moments(x + offset + start, Runs{std::min(kBlock, r.n - start), r.runs, r.stride}));
      }
      partial[i] = m;
    }
  });
  const int64_t per_channel = chunks.per_channel();
  for (int64_t c = 0; c < l.C; ++c) {
    out[c] = Moments<double>{0, 0, 0};
    for (int64_t j = c * per_channel; j < (c + 1) * per_channel; ++j) out[c] = merge_moments(out[c], partial[j]);
  }
}

// Moments of each channel over `rows` rows from `first` (strided Rows layout), accumulated in A
// relative to the first row; false if a sum is not finite.
template <typename A, typename T>
bool rows_block_moments(const T* x, const ChannelLayout& l, int64_t first, int64_t rows, A* __restrict shift,
                        A* __restrict mean, A* __restrict m2) {
  const int64_t C = l.C;
  const T* p0 = x + RowCursor(l, first).offset();
  for (int64_t c = 0; c < C; ++c) {
    shift[c] = static_cast<A>(to_acc(p0[c]));
    mean[c] = m2[c] = A(0);
  }
  auto value = [&](const T* p, int64_t c) { return static_cast<A>(to_acc(p[c])) - shift[c]; };
  for_row_groups(
      l, first, rows,
      [&](int64_t o0, int64_t o1, int64_t o2, int64_t o3) {
        const T *p0 = x + o0, *p1 = x + o1, *p2 = x + o2, *p3 = x + o3;
        for (int64_t c = 0; c < C; ++c) mean[c] += (value(p0, c) + value(p1, c)) + (value(p2, c) + value(p3, c));
      },
      [&](int64_t o) {
        for (int64_t c = 0; c < C; ++c) mean[c] += value(x + o, c);
      });
  for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<A>(rows);
  auto square = [&](const T* p, int64_t c) {
    const A d = value(p, c) - mean[c];
    return d * d;
  };
  for_row_groups(
      l, first, rows,
      [&](int64_t o0, int64_t o1, int64_t o2, int64_t o3) {
        const T *p0 = x + o0, *p1 = x + o1, *p2 = x + o2, *p3 = x + o3;
        for (int64_t c = 0; c < C; ++c) m2[c] += (square(p0, c) + square(p1, c)) + (square(p2, c) + square(p3, c));
      },
      [&](int64_t o) {
        for (int64_t c = 0; c < C; ++c) m2[c] += square(x + o, c);
      });
  bool finite = true;
  for (int64_t c = 0; c < C; ++c) finite = finite && std::isfinite(mean[c]) && std::isfinite(m2[c]);
  return finite;
}

template <typename T>
void statistics_rows(const T* x, const ChannelLayout& l, Moments<double>* out) {
  using acc = acc_type<T>;
  const int64_t C = l.C;
  const RowRanges ranges(l);
  Scratch<Moments<double>> partial(ranges.count * C);
  parallel_for(ranges.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc> scratch(3 * C);
    Scratch<double> wide(3 * C);
    for (int64_t r = begin; r < end; ++r) {
      Moments<double>* range = &partial[r * C];
      ranges.for_blocks(r, [&](int64_t first, int64_t rows) {
        auto merge = [&](auto* shift) {
          const auto* mean = shift + C;
          const auto* m2 = mean + C;
          for (int64_t c = 0; c < C; ++c) {
            range[c] = merge_moments(range[c],
                                     Moments<double>{double(rows), double(shift[c]) + double(mean[c]), double(m2[c])});
          }
        };
        if (rows_block_moments<acc>(x, l, first, rows, &scratch[0], &scratch[C], &scratch[2 * C])) {
          merge(&scratch[0]);
        } else {
          rows_block_moments<double>(x, l, first, rows, &wide[0], &wide[C], &wide[2 * C]);
          merge(&wide[0]);
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
// Dense channels-last tensors (the flat plan): the tensor is one run of N*S*C values in which value
// i belongs to channel i % C. It is walked in periods of P values, P a multiple of C (for C < 64
// also of 16, and at least 64), with the per-channel coefficients expanded to P positions: every
// inner loop runs over P contiguous values with unit-stride coefficients and vectorizes whatever C
// is (C = 2 runs like a plain array loop). Reductions accumulate per position and fold positions
// into channels once per block.

bool is_dense_rows(const ChannelLayout& l) {
  return l.kind == ChannelLayout::Kind::Rows && l.stride_c == 1 && (l.S == 1 || l.stride_s == l.C) &&
         (l.N == 1 || l.stride_n == l.S * l.C);
}

struct FlatPlan {
  int64_t C, P, total, periods, full;  // the last period may be partial (its length a multiple of C)
  explicit FlatPlan(const ChannelLayout& l) : C(std::max<int64_t>(l.C, 1)), total(l.N * l.S * l.C) {
    const int64_t base = C >= 64 ? C : C * 16 / std::gcd<int64_t>(C, 16);
    P = base * ceil_div(64, base);
    periods = ceil_div(total, P);
    full = total / P;
  }
  // out[p] = per_channel[p % C] for the P positions.
  template <typename A>
  void broadcast(const A* per_channel, A* out) const {
    for (int64_t p = per_channel == out ? C : 0; p < P; p += C) std::copy(per_channel, per_channel + C, out + p);
  }
  // Calls f(offset) for groups of four full periods of [q0, q1), then single(offset, length) for the rest.
  template <typename Group, typename Single>
  void for_period_groups(int64_t q0, int64_t q1, const Group& group, const Single& single) const {
    int64_t q = q0;
    for (; q + 4 <= std::min(q1, full); q += 4) group(q * P);
    for (; q < q1; ++q) single(q * P, length(q));
  }
  int64_t length(int64_t period) const {
    return std::min(P, total - period * P);
  }
  // An array of f(p % C) for the P positions.
  template <typename V, typename F>
  std::unique_ptr<V[]> expand(const F& f) const {
    std::unique_ptr<V[]> out(new V[static_cast<size_t>(P)]);
    for (int64_t c = 0; c < C; ++c) out[c] = f(c);
    broadcast(out.get(), out.get());
    return out;
  }
};

// Calls body(offset, length) for every period, in parallel.
template <typename F>
void flat_for(const FlatPlan& f, const F& body) {
  parallel_for(f.periods, std::max<int64_t>(1, kGrain / f.P), [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) body(q * f.P, f.length(q));
  });
}

// Reductions: the periods are split into ranges (tasks; the split depends on the shape only), and
// ranges into blocks of `block` periods.
struct FlatRanges {
  int64_t count, length, block;
  explicit FlatRanges(const FlatPlan& f) {
    count = std::clamp<int64_t>(ceil_div(f.total, kGrain), 1, kMinTasks);
    count = std::min(count, std::max<int64_t>(f.periods, 1));
    length = std::max<int64_t>(1, ceil_div(f.periods, count));
    count = ceil_div(f.periods, length);
    block = std::max<int64_t>(8, ceil_div(kBlock, f.P));
  }
  // Calls f(first_period, end_period) for the blocks of range r.
  template <typename F>
  void for_blocks(const FlatPlan& plan, int64_t r, const F& f) const {
    const int64_t first = r * length, last = std::min(plan.periods, first + length);
    for (int64_t q = first; q < last; q += block) f(q, std::min(last, q + block));
  }
};

// sum over the positions of each channel: out[c] = sum(a[c + k * C]).
template <typename A>
void fold_positions(const FlatPlan& f, const A* a, A* out) {
  for (int64_t c = 0; c < f.C; ++c) out[c] = a[c];
  for (int64_t p = f.C; p < f.P; p += f.C) {
    for (int64_t c = 0; c < f.C; ++c) out[c] += a[p + c];
  }
}

// Per-range work arrays of the flat statistics, in accumulate type A.
template <typename A>
struct FlatMomentScratch {
  Scratch<A> data;
  A *shift, *sum, *square, *centre, *channel_mean, *channel_centre, *channel_m2;
  explicit FlatMomentScratch(const FlatPlan& f) : data(4 * f.P + 3 * f.C) {
    shift = &data[0];
    sum = shift + f.P;
    square = sum + f.P;
    centre = square + f.P;
    channel_mean = centre + f.P;
    channel_centre = channel_mean + f.C;
    channel_m2 = channel_centre + f.C;
  }
};

// Moments of each channel over periods [q0, q1) in A: the mean relative to s.shift, then squares
// about that mean rounded to A, corrected as in run_moments; adds n * mean and m2 + n * mean^2 (n
// values per channel, mean relative to the shift) to t1 and t2. False, with nothing added, if a
// float sum is not finite.
template <typename A, typename T>
bool flat_block_moments(const T* x, const FlatPlan& f, int64_t q0, int64_t q1, FlatMomentScratch<A>& s, double* t1,
                        double* t2) {
  const int64_t P = f.P, C = f.C;
  A* __restrict sum = s.sum;
  A* __restrict square = s.square;
  const A* __restrict shift = s.shift;
  A* __restrict centre = s.centre;
  std::fill(sum, sum + P, A(0));
  std::fill(square, square + P, A(0));
  auto value = [](const T* __restrict p, int64_t j) { return static_cast<A>(to_acc(p[j])); };
  f.for_period_groups(
      q0, q1,
      [&](int64_t at) {
        const T* __restrict p = x + at;
        for (int64_t j = 0; j < P; ++j) {
          sum[j] += ((value(p, j) - shift[j]) + (value(p + P, j) - shift[j])) +
                    ((value(p + 2 * P, j) - shift[j]) + (value(p + 3 * P, j) - shift[j]));
        }
      },
      [&](int64_t at, int64_t len) {
        const T* __restrict p = x + at;
        for (int64_t j = 0; j < len; ++j) sum[j] += value(p, j) - shift[j];
      });
  int64_t values = 0;
  for (int64_t q = q0; q < q1; ++q) values += f.length(q);
  const A n = static_cast<A>(values / C);
  fold_positions(f, sum, s.channel_mean);
  for (int64_t c = 0; c < C; ++c) {
    s.channel_mean[c] /= n;
    s.channel_centre[c] = shift[c] + s.channel_mean[c];
  }
  f.broadcast(s.channel_centre, centre);
  auto square_of = [&](const T* __restrict p, int64_t j) {
    const A d = value(p, j) - centre[j];
    return d * d;
  };
  f.for_period_groups(
      q0, q1,
      [&](int64_t at) {
        const T* __restrict p = x + at;
        for (int64_t j = 0; j < P; ++j) {
          square[j] += (square_of(p, j) + square_of(p + P, j)) + (square_of(p + 2 * P, j) + square_of(p + 3 * P, j));
        }
      },
      [&](int64_t at, int64_t len) {
        const T* __restrict p = x + at;
        for (int64_t j = 0; j < len; ++j) square[j] += square_of(p, j);
      });
  fold_positions(f, square, s.channel_m2);
  if constexpr (!std::is_same_v<A, double>) {
    bool finite = true;
    for (int64_t c = 0; c < C; ++c) finite = finite && std::isfinite(s.channel_mean[c]) && std::isfinite(s.channel_m2[c]);
    if (!finite) return false;
  }
  const double dn = double(values / C);
  for (int64_t c = 0; c < C; ++c) {
    const double m = s.channel_mean[c];
    const double rounding = (double(shift[c]) + m) - double(s.channel_centre[c]);
    t1[c] += dn * m;
    t2[c] += (double(s.channel_m2[c]) - dn * rounding * rounding) + dn * m * m;
  }
  return true;
}

// Each range's blocks are combined as shifted sums in double (t1 = sum of n * block mean, t2 = sum
// of m2 + n * block mean^2, all relative to the range's shift, a value of the data): no division
// per block and channel; t2 - t1^2 / n loses precision only if the shift lies millions of standard
// deviations from the mean. Ranges are merged with Chan's formula.
template <typename T>
void statistics_flat(const T* x, const ChannelLayout& l, Moments<double>* out) {
  using acc = acc_type<T>;
  const FlatPlan f(l);
  const FlatRanges ranges(f);
  const int64_t C = f.C;
  Scratch<Moments<double>> partial(ranges.count * C);
  parallel_for(ranges.count, 1, [&](int64_t begin, int64_t end) {
    FlatMomentScratch<acc> narrow(f);
    std::unique_ptr<FlatMomentScratch<double>> wide;
    Scratch<double> sums(2 * C);
    for (int64_t r = begin; r < end; ++r) {
      // Both scratches use the range's shift (t1 and t2 are relative to it): the wide one, made at the
      // first overflow of the task, is reset for every later range too.
      const T* first = x + r * ranges.length * f.P;
      auto set_shift = [&](auto& scratch) {
        for (int64_t c = 0; c < C; ++c) scratch.shift[c] = to_acc(first[c]);
        f.broadcast(scratch.shift, scratch.shift);
      };
      set_shift(narrow);
      if (wide) set_shift(*wide);
      double* t1 = &sums[0];
      double* t2 = t1 + C;
      std::fill(t1, t1 + 2 * C, 0.0);
      int64_t values = 0;
      ranges.for_blocks(f, r, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) values += f.length(q);
        if (flat_block_moments(x, f, q0, q1, narrow, t1, t2)) return;
        if (!wide) {
          wide = std::make_unique<FlatMomentScratch<double>>(f);
          set_shift(*wide);
        }
        flat_block_moments(x, f, q0, q1, *wide, t1, t2);
      });
      const double n = double(values / C);
      for (int64_t c = 0; c < C; ++c) {
        const double m = t1[c] / n;
        partial[r * C + c] = {n, double(narrow.shift[c]) + m, std::max(0.0, t2[c] - t1[c] * m)};
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    out[c] = Moments<double>{0, 0, 0};
    for (int64_t r = 0; r < ranges.count; ++r) out[c] = merge_moments(out[c], partial[r * C + c]);
  }
}

// A channel whose merged mean is not finite holds a non-finite value (or, for float64, values whose
// double sums overflow). The shifted sums give NaN for an infinity (inf - shift, then inf - inf in the
// merges), where torch's mean is the plain sum's: +-inf for infinities of one sign, NaN for both signs
// or a NaN. This rare path recomputes such a channel's plain sum in double and keeps its mean when it
// is not finite; the variance is then NaN (as torch's).
template <typename T>
void nonfinite_channel_moments(const T* x, const ChannelLayout& l, int64_t c, Moments<double>& m) {
  double sum = 0;
  for (int64_t n = 0; n < l.N; ++n) {
    const T* p = x + n * l.stride_n + c * l.stride_c;
    for (int64_t s = 0; s < l.S; ++s) sum += static_cast<double>(to_acc(p[s * l.stride_s]));
  }
  const double mean = sum / m.count;
  if (std::isfinite(mean)) return;
  m.mean = mean;
  m.m2 = std::numeric_limits<double>::quiet_NaN();
}

// ---------------------------------------------------------------------------------------------
// Forward: x <- act((x - mean) * scale + bias) in place, optionally keeping the pre-activation.
// Centring first (as torch's batch_norm formula does) keeps the output exact for a large mean.

template <typename T, Activation act, bool keep_preact>
void normalize_act_kernel(T* x, T* preact, const ChannelLayout& l, const acc_type<T>* mean, const acc_type<T>* scale,
                          const acc_type<T>* bias, ActivationParam<acc_type<T>> param) {
  using acc = acc_type<T>;
  using Ops = ActivationOps<act>;
  if (l.kind == ChannelLayout::Kind::Planes) {
    parallel_for(l.N * l.C, kGrain / std::max<int64_t>(l.S, 1), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % l.C;
        const int64_t offset = (plane / l.C) * l.stride_n + c * l.stride_c;
        T* __restrict p = x + offset;
        T* __restrict z = keep_preact ? preact + offset : nullptr;
        const acc m = mean[c], a = scale[c], b = bias[c];
        for (int64_t s = 0; s < l.S; ++s) {
          const acc v = normalize(to_acc(p[s]), m, a, b);
          if constexpr (keep_preact) z[s] = from_acc<T>(v);
          p[s] = from_acc<T>(Ops::forward(v, param));
        }
      }
    });
  } else if (is_dense_rows(l)) {
    const FlatPlan f(l);
    const auto m = f.expand<acc>([&](int64_t c) { return mean[c]; });
    const auto a = f.expand<acc>([&](int64_t c) { return scale[c]; });
    const auto b = f.expand<acc>([&](int64_t c) { return bias[c]; });
    flat_for(f, [&](int64_t offset, int64_t len) {
      T* __restrict p = x + offset;
      T* __restrict z = keep_preact ? preact + offset : nullptr;
      const acc* __restrict pm = m.get();
      const acc* __restrict pa = a.get();
      const acc* __restrict pb = b.get();
      for (int64_t j = 0; j < len; ++j) {
        const acc v = normalize(to_acc(p[j]), pm[j], pa[j], pb[j]);
        if constexpr (keep_preact) z[j] = from_acc<T>(v);
        p[j] = from_acc<T>(Ops::forward(v, param));
      }
    });
  } else {
    parallel_for(l.N * l.S, kGrain / std::max<int64_t>(l.C, 1), [&](int64_t begin, int64_t end) {
      for_rows(l, begin, end - begin, [&](int64_t offset) {
        T* p = x + offset;
        T* z = keep_preact ? preact + offset : nullptr;
        for (int64_t c = 0; c < l.C; ++c) {
          const acc v = normalize(to_acc(p[c]), mean[c], scale[c], bias[c]);
          if constexpr (keep_preact) z[c] = from_acc<T>(v);
          p[c] = from_acc<T>(Ops::forward(v, param));
        }
      });
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Backward reduction: sum(dz) and sum(dz * (z - b)) per channel, from the kept y and dy.

// (z, dz) of element j, recovered from y; z also stored to z_out[j] if keep_z (for the input gradient).
template <Activation act, bool keep_z, typename T, typename acc>
inline void reduce_z_dz(const T* y, const T* dy, T* z_out, int64_t j, ActivationParam<acc> param, acc& z, acc& dz) {
  ActivationOps<act>::recover(to_acc(y[j]), to_acc(dy[j]), param, z, dz);
  if constexpr (keep_z) z_out[j] = z;
}

// Four consecutive periods of P values into the per-position sums s1, s2 (and z into pz if keep_z).
// A function of its own: its restrict parameters survive inlining, whereas through the lambdas GCC 12
// counted more than 10 possible aliases with pz's stores and left the loop scalar (7x slower).
template <Activation act, bool keep_z, typename T, typename acc>
inline void reduce_four_periods(const T* __restrict py, const T* __restrict pdy, T* __restrict pz, int64_t P,
                                const acc* __restrict b, ActivationParam<acc> param, acc* __restrict s1,
                                acc* __restrict s2) {
  for (int64_t j = 0; j < P; ++j) {
    acc z0, dz0, z1, dz1, z2, dz2, z3, dz3;
    reduce_z_dz<act, keep_z>(py, pdy, pz, j, param, z0, dz0);
    reduce_z_dz<act, keep_z>(py, pdy, pz, j + P, param, z1, dz1);
    reduce_z_dz<act, keep_z>(py, pdy, pz, j + 2 * P, param, z2, dz2);
    reduce_z_dz<act, keep_z>(py, pdy, pz, j + 3 * P, param, z3, dz3);
    const acc bj = b[j];
    s1[j] += (dz0 + dz1) + (dz2 + dz3);
    s2[j] += (dz0 * (z0 - bj) + dz1 * (z1 - bj)) + (dz2 * (z2 - bj) + dz3 * (z3 - bj));
  }
}

template <typename T, Activation act, bool keep_z>
void backward_reduce_flat(const T* y, const T* dy, T* z_out, const ChannelLayout& l, const acc_type<T>* bias,
                          ActivationParam<acc_type<T>> param, double* sum_dz, double* sum_dz_centered) {
  using acc = acc_type<T>;
  const FlatPlan f(l);
  const FlatRanges ranges(f);
  const int64_t C = f.C, P = f.P;
  const auto expanded_bias = f.expand<acc>([&](int64_t c) { return bias[c]; });
  Scratch<double> partial(2 * ranges.count * P);
  parallel_for(ranges.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc> scratch(2 * P);
    acc* __restrict s1 = &scratch[0];
    acc* __restrict s2 = s1 + P;
    const acc* __restrict b = expanded_bias.get();
    for (int64_t r = begin; r < end; ++r) {
      double* __restrict range_dz = &partial[2 * r * P];
      double* __restrict range_centered = range_dz + P;
      ranges.for_blocks(f, r, [&](int64_t q0, int64_t q1) {
        std::fill(s1, s1 + 2 * P, acc(0));
        f.for_period_groups(
            q0, q1,
            [&](int64_t at) {
              reduce_four_periods<act, keep_z>(y + at, dy + at, keep_z ? z_out + at : nullptr, P, b, param, s1, s2);
            },
            [&](int64_t at, int64_t len) {
              const T* __restrict py = y + at;
              const T* __restrict pdy = dy + at;
              T* __restrict pz = keep_z ? z_out + at : nullptr;
              for (int64_t j = 0; j < len; ++j) {
                acc z, dz;
                reduce_z_dz<act, keep_z>(py, pdy, pz, j, param, z, dz);
                s1[j] += dz;
                s2[j] += dz * (z - b[j]);
              }
            });
        for (int64_t j = 0; j < P; ++j) {
          range_dz[j] += s1[j];
          range_centered[j] += s2[j];
        }
      });
    }
  });
  for (int64_t r = 0; r < ranges.count; ++r) {
    for (int64_t j = 0; j < P; j += C) {
      for (int64_t c = 0; c < C; ++c) {
        sum_dz[c] += partial[2 * r * P + j + c];
        sum_dz_centered[c] += partial[2 * r * P + P + j + c];
      }
    }
  }
}

// keep_z: z is also written to z_out, laid out like y, for backward_input_kernel<..., true>.
template <typename T, Activation act, bool keep_z>
void backward_reduce_kernel(const T* y, const T* dy, T* z_out, const ChannelLayout& l, const acc_type<T>* bias,
                            ActivationParam<acc_type<T>> param, double* sum_dz, double* sum_dz_centered) {
  using acc = acc_type<T>;
  static_assert(!keep_z || std::is_same_v<T, acc>, "z is kept exactly, in the accumulate type");
  for (int64_t c = 0; c < l.C; ++c) sum_dz[c] = sum_dz_centered[c] = 0;
  if (l.kind == ChannelLayout::Kind::Planes) {
    const PlaneChunks chunks(l);
    Scratch<double> partial(2 * chunks.count);
    parallel_for(chunks.count, kGrain / chunks.task_values(), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t c, offset;
        Runs r;
        chunks.span(l, i, c, offset, r);
        const acc b = bias[c];
        double total_dz = 0, total_centered = 0;
        for (int64_t start = 0; start < r.n; start += kBlock) {
          const T* py = y + offset + start;
          const T* pdy = dy + offset + start;
          T* pz = keep_z ? z_out + offset + start : nullptr;
          acc block_dz, block_centered;
          lane_sum2<kLanes>(
              Runs{std::min(kBlock, r.n - start), r.runs, r.stride},
              [&](int64_t j, acc& s1, acc& s2) {
                acc z, dz;
                reduce_z_dz<act, keep_z>(py, pdy, pz, j, param, z, dz);
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
    const int64_t per_channel = chunks.per_channel();
    for (int64_t c = 0; c < l.C; ++c) {
      for (int64_t j = c * per_channel; j < (c + 1) * per_channel; ++j) {
        sum_dz[c] += partial[2 * j];
        sum_dz_centered[c] += partial[2 * j + 1];
      }
    }
  } else if (is_dense_rows(l)) {
    backward_reduce_flat<T, act, keep_z>(y, dy, z_out, l, bias, param, sum_dz, sum_dz_centered);
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
          for_rows(l, first, rows, [&](int64_t o) {  // y and dy share strides
            for (int64_t c = 0; c < C; ++c) {
              acc z, dz;
              reduce_z_dz<act, keep_z>(y, dy, z_out, o + c, param, z, dz);
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

// (z, dz) of element j: z read back from dx, where the reduction kept it (z_in_dx), or recovered from y.
template <Activation act, bool z_in_dx, typename T, typename acc>
inline void input_z_dz(const T* y, const T* dy, const T* dx, int64_t j, ActivationParam<acc> param, acc& z, acc& dz) {
  if constexpr (z_in_dx) {
    z = to_acc(dx[j]);
    dz = ActivationOps<act>::gradient(to_acc(y[j]), to_acc(dy[j]), param);
  } else {
    ActivationOps<act>::recover(to_acc(y[j]), to_acc(dy[j]), param, z, dz);
  }
}

template <typename T, Activation act, bool z_in_dx>
void backward_input_kernel(const T* y, const T* dy, T* dx, const ChannelLayout& l, const acc_type<T>* dz_scale,
                           const acc_type<T>* bias, const acc_type<T>* centered_scale, const acc_type<T>* offset,
                           ActivationParam<acc_type<T>> param) {
  using acc = acc_type<T>;
  if (l.kind == ChannelLayout::Kind::Planes) {
    parallel_for(l.N * l.C, kGrain / std::max<int64_t>(l.S, 1), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t c = plane % l.C;
        const int64_t at = (plane / l.C) * l.stride_n + c * l.stride_c;
        const T* __restrict py = y + at;
        const T* __restrict pdy = dy + at;
        T* __restrict pdx = dx + at;
        const InputGradCoeffs<acc> k{dz_scale[c], bias[c], centered_scale[c], offset[c]};
        for (int64_t s = 0; s < l.S; ++s) {
          acc z, dz;
          input_z_dz<act, z_in_dx>(py, pdy, pdx, s, param, z, dz);
          pdx[s] = from_acc<T>(input_grad(k, z, dz));
        }
      }
    });
  } else if (is_dense_rows(l)) {
    const FlatPlan f(l);
    // One array per coefficient (unit-stride loads that vectorize), not an array of structs.
    const auto k_dz = f.expand<acc>([&](int64_t c) { return dz_scale[c]; });
    const auto k_bias = f.expand<acc>([&](int64_t c) { return bias[c]; });
    const auto k_centered = f.expand<acc>([&](int64_t c) { return centered_scale[c]; });
    const auto k_offset = f.expand<acc>([&](int64_t c) { return offset[c]; });
    flat_for(f, [&](int64_t at, int64_t len) {
      const T* __restrict py = y + at;
      const T* __restrict pdy = dy + at;
      T* __restrict pdx = dx + at;
      const acc* __restrict a = k_dz.get();
      const acc* __restrict b = k_bias.get();
      const acc* __restrict c = k_centered.get();
      const acc* __restrict o = k_offset.get();
      for (int64_t j = 0; j < len; ++j) {
        acc z, dz;
        input_z_dz<act, z_in_dx>(py, pdy, pdx, j, param, z, dz);
        pdx[j] = from_acc<T>(input_grad(InputGradCoeffs<acc>{a[j], b[j], c[j], o[j]}, z, dz));
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
          input_z_dz<act, z_in_dx>(py, pdy, pdx, c, param, z, dz);
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
    } else if (is_dense_rows(layout)) {
      statistics_flat(p, layout, &moments[0]);
    } else {
      statistics_rows(p, layout, &moments[0]);
    }
    for (int64_t c = 0; c < layout.C; ++c) {
      if (moments[c].count > 0 && !std::isfinite(moments[c].mean)) nonfinite_channel_moments(p, layout, c, moments[c]);
      const Moments<double>& m = moments[c];
      static_cast<acc*>(mean)[c] = static_cast<acc>(m.mean);
      static_cast<acc*>(var)[c] = m.count > 0 ? static_cast<acc>(m.m2 / m.count) : acc(0);
    }
  });
}

void normalize_act(DType dtype, void* x, void* preact, const ChannelLayout& layout, const void* mean,
                   const void* scale, const void* bias, Activation activation, double activation_param_value) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    const auto param = activation_param<acc>(activation_param_value);
    const acc* m = static_cast<const acc*>(mean);
    const acc* a = static_cast<const acc*>(scale);
    const acc* b = static_cast<const acc*>(bias);
    dispatch_activation(activation, [&](auto act) {
      if (preact != nullptr) {
        normalize_act_kernel<T, decltype(act)::value, true>(static_cast<T*>(x), static_cast<T*>(preact), layout, m, a,
                                                             b, param);
      } else {
        normalize_act_kernel<T, decltype(act)::value, false>(static_cast<T*>(x), nullptr, layout, m, a, b, param);
      }
    });
  });
}

// Whether the reduction keeps z for the input gradient: for ELU, whose inverse is a log, and only where
// T is its accumulate type (exact). Elsewhere recomputing z costs less than writing and reading it.
template <typename T, Activation act>
constexpr bool keeps_z = act == Activation::Elu && std::is_same_v<T, acc_type<T>>;

// run(std::true_type{}) where z is to be kept (wanted, and keeps_z), else run(std::false_type{}); returns which.
template <typename T, Activation act, typename Run>
bool with_kept_z(bool wanted, const Run& run) {
  if constexpr (keeps_z<T, act>) {
    if (wanted) {
      run(std::true_type{});
      return true;
    }
  }
  run(std::false_type{});
  return false;
}

bool backward_reduce(DType dtype, const void* y, const void* dy, void* z_out, const ChannelLayout& layout,
                     const void* bias, Activation activation, double activation_param_value, double* sum_dz,
                     double* sum_dz_centered) {
  bool kept = false;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    dispatch_activation(activation, [&](auto act) {
      constexpr Activation a = decltype(act)::value;
      const auto run = [&](auto keep) {
        backward_reduce_kernel<T, a, decltype(keep)::value>(
            static_cast<const T*>(y), static_cast<const T*>(dy), static_cast<T*>(z_out), layout,
            static_cast<const acc*>(bias), activation_param<acc>(activation_param_value), sum_dz, sum_dz_centered);
      };
      kept = with_kept_z<T, a>(z_out != nullptr, run);
    });
  });
  return kept;
}

void backward_input(DType dtype, const void* y, const void* dy, void* dx, bool dx_holds_z, const ChannelLayout& layout,
                    const void* dz_scale, const void* bias, const void* centered_scale, const void* offset,
                    Activation activation, double activation_param_value) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using acc = acc_type<T>;
    dispatch_activation(activation, [&](auto act) {
      constexpr Activation a = decltype(act)::value;
      const auto run = [&](auto z_in_dx) {
        backward_input_kernel<T, a, decltype(z_in_dx)::value>(
            static_cast<const T*>(y), static_cast<const T*>(dy), static_cast<T*>(dx), layout,
            static_cast<const acc*>(dz_scale), static_cast<const acc*>(bias), static_cast<const acc*>(centered_scale),
            static_cast<const acc*>(offset), activation_param<acc>(activation_param_value));
      };
      with_kept_z<T, a>(dx_holds_z, run);
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
