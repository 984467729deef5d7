// How a tensor of shape (N, C, *) is walked by the kernels: as (N, C, S), S the product of the
// trailing sizes, in one of two layouts with a contiguous innermost run.
#pragma once

#include <cstdint>
#include <string>

#include <torch/csrc/stable/tensor.h>

#include "check.h"

namespace inplace_abn {

using torch::stable::Tensor;

struct ChannelLayout {
  enum class Kind {
    Planes,  // each (n, c) is a contiguous run of S values (NCHW, "contiguous")
    Rows,    // each (n, s) is a contiguous run of C values (NHWC, "channels_last"; also (N, C))
  };
  Kind kind;
  int64_t N, C, S;
  int64_t stride_n, stride_c, stride_s;

  int64_t numel() const {
    return N * C * S;
  }
};

// Describes `t` (named `name` in errors) as (N, C, S). Fails with a clear message when the trailing
// dimensions cannot be walked with one stride, or when neither channels nor the trailing dimensions
// are contiguous; the Python layer routes such tensors through a contiguous copy first.
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
  // Collapse the trailing dimensions into one (size-1 dimensions do not constrain strides).
  int64_t expected_stride = -1;
  for (int64_t d = dim - 1; d >= 2; --d) {
    const int64_t size = t.size(d);
    if (size == 1) {
      continue;
    }
    if (expected_stride < 0) {
      layout.stride_s = t.stride(d);
    } else {
      ABN_CHECK(t.stride(d) == expected_stride, name,
                      ": the dimensions after the channel dimension cannot be walked with one stride "
                      "(make the tensor contiguous)");
    }
    expected_stride = t.stride(d) * size;
    layout.S *= size;
  }
  const bool planes = layout.stride_s == 1 && (layout.S > 1 || layout.stride_c != 1);
  const bool rows = layout.stride_c == 1;
  ABN_CHECK(planes || rows, name,
                  ": unsupported memory layout, expected contiguous or channels_last (make it contiguous)");
  layout.kind = planes ? ChannelLayout::Kind::Planes : ChannelLayout::Kind::Rows;
  // A stride of 0 on a dimension of size > 1 means elements share memory (an expanded tensor).
  for (int64_t d = 0; d < dim; ++d) {
    ABN_CHECK(t.size(d) <= 1 || t.stride(d) != 0, name,
                    " has overlapping memory (an expanded tensor); pass a contiguous tensor");
  }
  return layout;
}

// Tensors read or written together must share sizes and strides, so one layout walks them all.
inline void check_same_geometry(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  ABN_CHECK(a.dim() == b.dim(), b_name, " must have the shape of ", a_name);
  for (int64_t d = 0; d < a.dim(); ++d) {
    ABN_CHECK(a.size(d) == b.size(d), b_name, " must have the shape of ", a_name, " (dimension ", d, ": ",
              b.size(d), " vs ", a.size(d), ")");
  }
  for (int64_t d = 0; d < a.dim(); ++d) {
    ABN_CHECK(a.size(d) <= 1 || a.stride(d) == b.stride(d), b_name, " must have the strides of ", a_name,
              " (dimension ", d, ")");
  }
  ABN_CHECK(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name);
}

}  // namespace inplace_abn
