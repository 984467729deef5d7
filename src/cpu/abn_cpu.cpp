// CPU kernels of In-Place ABN: one-pass statistics, in-place normalize + activate, and the two
// backward passes (reduction of sum(dz) and sum(dz * xhat); input gradient), each reading the
// tensor once. Tensors are walked as channel planes (NCHW) or channel rows (NHWC), see
// channel_layout.h; the per-channel formulas live in abn_math.h.
//
// Reductions are deterministic (the split into tasks depends on the shape only, never on the
// thread count): blocks of kBlock values are reduced in the accumulate type with kLanes
// independent partial sums (which the compiler vectorizes), then folded in double.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "../abn_math.h"
#include "../channel_layout.h"
#include "../op_args.h"

namespace inplace_abn {
namespace {

constexpr int kLanes = 16;           // independent partial sums per reduction
constexpr int64_t kBlock = 4096;     // values reduced in the accumulate type before folding in double
constexpr int64_t kGrain = 32768;    // values per parallel task, at least
constexpr int64_t kMinTasks = 64;    // reductions are split into at least this many tasks when possible

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename F>
void parallel_for(int64_t count, int64_t grain, const F& f) {
  if (count <= 0) return;
  torch::stable::parallel_for(0, count, std::max<int64_t>(grain, 1), f);
}

// A per-channel vector of any float dtype, converted to `acc` (`fallback` where absent).
template <typename acc>
std::vector<acc> load_channel_vector(const std::optional<Tensor>& t, int64_t channels, acc fallback) {
  std::vector<acc> out(static_cast<size_t>(channels), fallback);
  if (!t.has_value()) return out;
  dispatch_float_type(t->scalar_type(), "load_channel_vector", [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const scalar_t* p = t->const_data_ptr<scalar_t>();
    const int64_t stride = t->stride(0);
    for (int64_t c = 0; c < channels; ++c) out[c] = static_cast<acc>(p[c * stride]);
  });
  return out;
}

template <typename acc>
void store_channel_vector(Tensor& t, const std::vector<acc>& values) {
  acc* p = t.mutable_data_ptr<acc>();
  std::copy(values.begin(), values.end(), p);
}

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

// Walks rows (n, s) of a Rows layout in order from a given row index.
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

// Reductions over Planes: tasks are chunks of the planes, indexed (c, n, k) so that each channel's
// partial results are adjacent and merged in a fixed order.
struct PlaneChunks {
  int64_t per_plane, length, count;
  explicit PlaneChunks(const ChannelLayout& l) {
    const int64_t planes = l.N * l.C;
    const int64_t wanted = ceil_div(kMinTasks, std::max<int64_t>(planes, 1));
    const int64_t most = std::max<int64_t>(1, l.S / (kBlock / 2));
    length = ceil_div(l.S, std::min(wanted, most));
    per_plane = ceil_div(l.S, length);
    count = planes * per_plane;
  }
  // The span of chunk i: offset of its first value and its length.
  std::pair<int64_t, int64_t> span(const ChannelLayout& l, int64_t i, int64_t& channel) const {
    const int64_t k = i % per_plane, plane = i / per_plane;
    const int64_t n = plane % l.N;
    channel = plane / l.N;
    const int64_t start = k * length;
    return {n * l.stride_n + channel * l.stride_c + start, std::min(length, l.S - start)};
  }
};

// Reductions over Rows: tasks are ranges of rows, each with per-channel accumulators.
struct RowRanges {
  int64_t rows, count, length, block_rows;
  explicit RowRanges(const ChannelLayout& l) {
    rows = l.N * l.S;
    count = std::clamp<int64_t>(ceil_div(l.numel(), kGrain), 1, kMinTasks);
    count = std::min(count, std::max<int64_t>(rows, 1));
    length = ceil_div(rows, count);
    count = ceil_div(rows, length);
    block_rows = std::max<int64_t>(8, kBlock / std::max<int64_t>(l.C, 1));
  }
};

// ---------------------------------------------------------------------------------------------
// Statistics: per-channel mean and biased variance.

template <typename T>
std::vector<Moments<double>> statistics_planes(const T* x, const ChannelLayout& l) {
  using acc = acc_type<T>;
  const PlaneChunks chunks(l);
  std::vector<Moments<double>> partial(static_cast<size_t>(chunks.count));
  parallel_for(chunks.count, kGrain / chunks.length, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t channel;
      const auto [offset, length] = chunks.span(l, i, channel);
      Moments<double> m{0, 0, 0};
      for (int64_t start = 0; start < length; start += kBlock) {
        const T* p = x + offset + start;
        const int64_t n = std::min(kBlock, length - start);
        const acc mean = lane_sum<acc>(n, [&](int64_t j) { return static_cast<acc>(p[j]); }) / acc(n);
        const acc m2 = lane_sum<acc>(n, [&](int64_t j) {
          const acc d = static_cast<acc>(p[j]) - mean;
          return d * d;
        });
        m = merge_moments(m, Moments<double>{double(n), double(mean), double(m2)});
      }
      partial[i] = m;
    }
  });
  std::vector<Moments<double>> out(static_cast<size_t>(l.C), Moments<double>{0, 0, 0});
  const int64_t per_channel = l.N * chunks.per_plane;
  parallel_for(l.C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t j = c * per_channel; j < (c + 1) * per_channel; ++j) out[c] = merge_moments(out[c], partial[j]);
    }
  });
  return out;
}

template <typename T>
std::vector<Moments<double>> statistics_rows(const T* x, const ChannelLayout& l) {
  using acc = acc_type<T>;
  const int64_t C = l.C;
  const RowRanges ranges(l);
  std::vector<Moments<double>> partial(static_cast<size_t>(ranges.count * C), Moments<double>{0, 0, 0});
  parallel_for(ranges.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> sum(C), mean(C), m2(C);
    for (int64_t r = begin; r < end; ++r) {
      Moments<double>* out = &partial[r * C];
      const int64_t first = r * ranges.length, last = std::min(ranges.rows, first + ranges.length);
      for (int64_t block = first; block < last; block += ranges.block_rows) {
        const int64_t n = std::min(ranges.block_rows, last - block);
        std::fill(sum.begin(), sum.end(), acc(0));
        std::fill(m2.begin(), m2.end(), acc(0));
        RowCursor row(l, block);
        for (int64_t k = 0; k < n; ++k, row.next()) {
          const T* p = x + row.offset();
          for (int64_t c = 0; c < C; ++c) sum[c] += static_cast<acc>(p[c]);
        }
        for (int64_t c = 0; c < C; ++c) mean[c] = sum[c] / acc(n);
        row = RowCursor(l, block);
        for (int64_t k = 0; k < n; ++k, row.next()) {
          const T* p = x + row.offset();
          for (int64_t c = 0; c < C; ++c) {
            const acc d = static_cast<acc>(p[c]) - mean[c];
            m2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          out[c] = merge_moments(out[c], Moments<double>{double(n), double(mean[c]), double(m2[c])});
        }
      }
    }
  });
  std::vector<Moments<double>> out(static_cast<size_t>(C), Moments<double>{0, 0, 0});
  for (int64_t r = 0; r < ranges.count; ++r) {
    for (int64_t c = 0; c < C; ++c) out[c] = merge_moments(out[c], partial[r * C + c]);
  }
  return out;
}

std::tuple<Tensor, Tensor> statistics(Tensor x) {
  check_input(x, "x");
  ABN_CHECK(x.is_cpu(), "inplace_abn CPU kernel called with a tensor that is not on the CPU");
  const ChannelLayout l = channel_layout(x, "x");
  const bool is_double = x.scalar_type() == ScalarType::Double;
  const ScalarType stat_type = is_double ? ScalarType::Double : ScalarType::Float;
  Tensor mean = torch::stable::new_empty(x, {l.C}, stat_type);
  Tensor var = torch::stable::new_empty(x, {l.C}, stat_type);
  dispatch_float_type(x.scalar_type(), "statistics", [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    using acc = acc_type<scalar_t>;
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    const auto moments = l.kind == ChannelLayout::Kind::Planes ? statistics_planes(p, l) : statistics_rows(p, l);
    std::vector<acc> m(l.C), v(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      const double count = moments[c].count;
      m[c] = static_cast<acc>(moments[c].mean);
      v[c] = count > 0 ? static_cast<acc>(moments[c].m2 / count) : acc(0);
    }
    store_channel_vector(mean, m);
    store_channel_vector(var, v);
  });
  return {mean, var};
}

// ---------------------------------------------------------------------------------------------
// Forward: x <- act(x * scale + shift) in place, optionally keeping the pre-activation.

template <typename T, Activation act>
void normalize_act_kernel(T* x, T* preact, const ChannelLayout& l, const std::vector<acc_type<T>>& scale,
                          const std::vector<acc_type<T>>& shift, ActivationParam<acc_type<T>> param) {
  using acc = acc_type<T>;
  using Ops = ActivationOps<act>;
  if (l.kind == ChannelLayout::Kind::Planes) {
    parallel_for(l.N * l.C, kGrain / std::max<int64_t>(l.S, 1), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / l.C, c = plane % l.C;
        const int64_t offset = n * l.stride_n + c * l.stride_c;
        T* p = x + offset;
        const acc a = scale[c], b = shift[c];
        if (preact != nullptr) {
          T* z = preact + offset;
          for (int64_t s = 0; s < l.S; ++s) {
            const acc v = static_cast<acc>(p[s]) * a + b;
            z[s] = static_cast<T>(v);
            p[s] = static_cast<T>(Ops::forward(v, param));
          }
        } else {
          for (int64_t s = 0; s < l.S; ++s) p[s] = static_cast<T>(Ops::forward(static_cast<acc>(p[s]) * a + b, param));
        }
      }
    });
  } else {
    const acc* a = scale.data();
    const acc* b = shift.data();
    parallel_for(l.N * l.S, kGrain / std::max<int64_t>(l.C, 1), [&](int64_t begin, int64_t end) {
      RowCursor row(l, begin);
      for (int64_t r = begin; r < end; ++r, row.next()) {
        T* p = x + row.offset();
        if (preact != nullptr) {
          T* z = preact + row.offset();
          for (int64_t c = 0; c < l.C; ++c) {
            const acc v = static_cast<acc>(p[c]) * a[c] + b[c];
            z[c] = static_cast<T>(v);
            p[c] = static_cast<T>(Ops::forward(v, param));
          }
        } else {
          for (int64_t c = 0; c < l.C; ++c) p[c] = static_cast<T>(Ops::forward(static_cast<acc>(p[c]) * a[c] + b[c], param));
        }
      }
    });
  }
}

void normalize_act_(Tensor x, Tensor mean, Tensor var, std::optional<Tensor> weight, std::optional<Tensor> bias,
                    double eps, std::string activation, double activation_param, std::optional<Tensor> preact) {
  check_input(x, "x");
  ABN_CHECK(x.is_cpu(), "inplace_abn CPU kernel called with a tensor that is not on the CPU");
  const Activation act = parse_activation(activation, activation_param);
  const ChannelLayout l = channel_layout(x, "x");
  check_channel_vector(mean, "mean", l.C, x);
  check_channel_vector(var, "var", l.C, x);
  check_channel_vector(weight, "weight", l.C, x);
  check_channel_vector(bias, "bias", l.C, x);
  ABN_CHECK(!preact.has_value() || act == Activation::Relu,
                  "preact is only written for activation 'relu' (the other activations are invertible)");
  if (preact.has_value()) check_same_geometry(x, "x", *preact, "preact");
  dispatch_float_type(x.scalar_type(), "normalize_act_", [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    using acc = acc_type<scalar_t>;
    const acc e = static_cast<acc>(eps);
    const auto m = load_channel_vector<acc>(mean, l.C, 0);
    const auto v = load_channel_vector<acc>(var, l.C, 1);
    const auto w = load_channel_vector<acc>(weight, l.C, 1);
    const auto b = load_channel_vector<acc>(bias, l.C, 0);
    std::vector<acc> scale(l.C), shift(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      const auto k = normalize_coeffs(m[c], v[c], affine_scale(w[c], weight.has_value(), e), b[c], e);
      scale[c] = k.scale;
      shift[c] = k.shift;
    }
    scalar_t* z = preact.has_value() ? preact->mutable_data_ptr<scalar_t>() : nullptr;
    dispatch_activation(act, [&](auto a) {
      normalize_act_kernel<scalar_t, decltype(a)::value>(x.mutable_data_ptr<scalar_t>(), z, l, scale, shift,
                                                          make_activation_param<acc>(activation_param));
    });
  });
}


// ---------------------------------------------------------------------------------------------
// Backward reduction: S1 = sum(dz), S2 = sum(dz * xhat) per channel, from the kept y and dy.
// Accumulates sum(dz * (z - b)) and divides by s once per channel (xhat = (z - b) / s).

template <typename T, Activation act>
void backward_reduce_kernel(const T* y, const T* dy, const ChannelLayout& l, const std::vector<acc_type<T>>& bias,
                            ActivationParam<acc_type<T>> param, std::vector<double>& sum_dz,
                            std::vector<double>& sum_dz_centered) {
  using acc = acc_type<T>;
  using Ops = ActivationOps<act>;
  if (l.kind == ChannelLayout::Kind::Planes) {
    const PlaneChunks chunks(l);
    std::vector<double> partial(static_cast<size_t>(2 * chunks.count));
    parallel_for(chunks.count, kGrain / chunks.length, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t c;
        const auto [offset, length] = chunks.span(l, i, c);
        const acc b = bias[c];
        double total_dz = 0, total_centered = 0;
        for (int64_t start = 0; start < length; start += kBlock) {
          const T* py = y + offset + start;
          const T* pdy = dy + offset + start;
          acc block_dz, block_centered;
          lane_sum2<acc>(
              std::min(kBlock, length - start),
              [&](int64_t j, acc& s1, acc& s2) {
                acc z, dz;
                Ops::recover(static_cast<acc>(py[j]), static_cast<acc>(pdy[j]), param, z, dz);
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
    std::vector<double> partial(static_cast<size_t>(2 * ranges.count * C), 0.0);
    parallel_for(ranges.count, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> block_dz(C), block_centered(C);
      const acc* b = bias.data();
      for (int64_t r = begin; r < end; ++r) {
        double* out_dz = &partial[2 * r * C];
        double* out_centered = out_dz + C;
        const int64_t first = r * ranges.length, last = std::min(ranges.rows, first + ranges.length);
        for (int64_t block = first; block < last; block += ranges.block_rows) {
          std::fill(block_dz.begin(), block_dz.end(), acc(0));
          std::fill(block_centered.begin(), block_centered.end(), acc(0));
          RowCursor row(l, block);
          for (int64_t k = 0; k < std::min(ranges.block_rows, last - block); ++k, row.next()) {
            const T* py = y + row.offset();
            const T* pdy = dy + row.offset();
            for (int64_t c = 0; c < C; ++c) {
              acc z, dz;
              Ops::recover(static_cast<acc>(py[c]), static_cast<acc>(pdy[c]), param, z, dz);
              block_dz[c] += dz;
              block_centered[c] += dz * (z - b[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            out_dz[c] += block_dz[c];
            out_centered[c] += block_centered[c];
          }
        }
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

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& y, const Tensor& dy, const std::optional<Tensor>& weight,
                                           const std::optional<Tensor>& bias, double eps, const std::string& activation,
                                           double activation_param) {
  check_input(y, "y");
  ABN_CHECK(y.is_cpu() && dy.is_cpu(), "inplace_abn CPU kernel called with a tensor that is not on the CPU");
  check_same_geometry(y, "y", dy, "dy");
  const Activation act = parse_activation(activation, activation_param);
  const ChannelLayout l = channel_layout(y, "y");
  check_channel_vector(weight, "weight", l.C, y);
  check_channel_vector(bias, "bias", l.C, y);
  const ScalarType stat_type = y.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
  Tensor sum_dz = torch::stable::new_empty(y, {l.C}, stat_type);
  Tensor sum_dz_xhat = torch::stable::new_empty(y, {l.C}, stat_type);
  dispatch_float_type(y.scalar_type(), "backward_reduce", [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    using acc = acc_type<scalar_t>;
    const acc e = static_cast<acc>(eps);
    const auto w = load_channel_vector<acc>(weight, l.C, 1);
    const auto b = load_channel_vector<acc>(bias, l.C, 0);
    std::vector<double> s1(l.C, 0.0), s2(l.C, 0.0);
    dispatch_activation(act, [&](auto a) {
      backward_reduce_kernel<scalar_t, decltype(a)::value>(y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                                            l, b, make_activation_param<acc>(activation_param), s1, s2);
    });
    std::vector<acc> out_dz(l.C), out_dz_xhat(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      out_dz[c] = static_cast<acc>(s1[c]);
      out_dz_xhat[c] = static_cast<acc>(s2[c] / static_cast<double>(affine_scale(w[c], weight.has_value(), e)));
    }
    store_channel_vector(sum_dz, out_dz);
    store_channel_vector(sum_dz_xhat, out_dz_xhat);
  });
  return {sum_dz, sum_dz_xhat};
}

// ---------------------------------------------------------------------------------------------
// Backward input gradient: dx = dz_scale * dz + centered_scale * (z - b) + offset.

template <typename T, Activation act>
void backward_input_kernel(const T* y, const T* dy, T* dx, const ChannelLayout& l,
                           const std::vector<InputGradCoeffs<acc_type<T>>>& coeffs, ActivationParam<acc_type<T>> param) {
  using acc = acc_type<T>;
  using Ops = ActivationOps<act>;
  if (l.kind == ChannelLayout::Kind::Planes) {
    parallel_for(l.N * l.C, kGrain / std::max<int64_t>(l.S, 1), [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / l.C, c = plane % l.C;
        const int64_t offset = n * l.stride_n + c * l.stride_c;
        const T* py = y + offset;
        const T* pdy = dy + offset;
        T* pdx = dx + offset;
        const InputGradCoeffs<acc> k = coeffs[c];
        for (int64_t s = 0; s < l.S; ++s) {
          acc z, dz;
          Ops::recover(static_cast<acc>(py[s]), static_cast<acc>(pdy[s]), param, z, dz);
          pdx[s] = static_cast<T>(input_grad(k, z, dz));
        }
      }
    });
  } else {
    // Structure of arrays, so the loop over channels vectorizes.
    std::vector<acc> dz_scale(l.C), bias(l.C), centered_scale(l.C), offset(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      dz_scale[c] = coeffs[c].dz_scale;
      bias[c] = coeffs[c].bias;
      centered_scale[c] = coeffs[c].centered_scale;
      offset[c] = coeffs[c].offset;
    }
    parallel_for(l.N * l.S, kGrain / std::max<int64_t>(l.C, 1), [&](int64_t begin, int64_t end) {
      RowCursor row(l, begin);
      for (int64_t r = begin; r < end; ++r, row.next()) {
        const T* py = y + row.offset();
        const T* pdy = dy + row.offset();
        T* pdx = dx + row.offset();
        for (int64_t c = 0; c < l.C; ++c) {
          acc z, dz;
          Ops::recover(static_cast<acc>(py[c]), static_cast<acc>(pdy[c]), param, z, dz);
          pdx[c] = static_cast<T>(input_grad(InputGradCoeffs<acc>{dz_scale[c], bias[c], centered_scale[c], offset[c]}, z, dz));
        }
      }
    });
  }
}

Tensor backward_input(const Tensor& y, const Tensor& dy, const Tensor& var, const std::optional<Tensor>& weight,
                      const std::optional<Tensor>& bias, const std::optional<Tensor>& sum_dz,
                      const std::optional<Tensor>& sum_dz_xhat, int64_t count, double eps, const std::string& activation,
                      double activation_param) {
  check_input(y, "y");
  ABN_CHECK(y.is_cpu() && dy.is_cpu(), "inplace_abn CPU kernel called with a tensor that is not on the CPU");
  check_same_geometry(y, "y", dy, "dy");
  const Activation act = parse_activation(activation, activation_param);
  const ChannelLayout l = channel_layout(y, "y");
  check_channel_vector(var, "var", l.C, y);
  check_channel_vector(weight, "weight", l.C, y);
  check_channel_vector(bias, "bias", l.C, y);
  check_channel_vector(sum_dz, "sum_dz", l.C, y);
  check_channel_vector(sum_dz_xhat, "sum_dz_xhat", l.C, y);
  const bool training = sum_dz.has_value();
  ABN_CHECK(sum_dz.has_value() == sum_dz_xhat.has_value(), "sum_dz and sum_dz_xhat must be given together");
  ABN_CHECK(!training || count > 0, "count must be positive, got ", count);
  Tensor dx = torch::stable::empty_like(y);
  check_same_geometry(y, "y", dx, "dx");
  dispatch_float_type(y.scalar_type(), "backward_input", [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    using acc = acc_type<scalar_t>;
    const acc e = static_cast<acc>(eps);
    const auto v = load_channel_vector<acc>(var, l.C, 1);
    const auto w = load_channel_vector<acc>(weight, l.C, 1);
    const auto b = load_channel_vector<acc>(bias, l.C, 0);
    const auto s1 = load_channel_vector<acc>(sum_dz, l.C, 0);
    const auto s2 = load_channel_vector<acc>(sum_dz_xhat, l.C, 0);
    std::vector<InputGradCoeffs<acc>> coeffs(l.C);
    for (int64_t c = 0; c < l.C; ++c) {
      coeffs[c] = input_grad_coeffs(v[c], affine_scale(w[c], weight.has_value(), e), b[c], e, training, s1[c], s2[c],
                                    static_cast<acc>(count));
    }
    dispatch_activation(act, [&](auto a) {
      backward_input_kernel<scalar_t, decltype(a)::value>(y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                                                           dx.mutable_data_ptr<scalar_t>(), l, coeffs,
                                                           make_activation_param<acc>(activation_param));
    });
  });
  return dx;
}

}  // namespace
}  // namespace inplace_abn

STABLE_TORCH_LIBRARY_IMPL(inplace_abn, CPU, m) {
  m.impl("statistics", TORCH_BOX(&inplace_abn::statistics));
  m.impl("normalize_act_", TORCH_BOX(&inplace_abn::normalize_act_));
  m.impl("backward_reduce", TORCH_BOX(&inplace_abn::backward_reduce));
  m.impl("backward_input", TORCH_BOX(&inplace_abn::backward_input));
}
