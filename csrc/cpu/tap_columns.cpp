#include "tap_columns.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace densenet_efficient::cpu {

namespace {
// Which input pixel each (output pixel p, tap t) reads: its flat index
// q = Σ_d q_d · Π_{e>d} S_e, or -1 where p + t − centre leaves the map.
struct TapGeometry {
  int64_t pixels = 1;  // P
  int64_t taps = 1;    // T
  std::vector<int64_t> source;  // [P·T]

  TapGeometry(at::IntArrayRef spatial, int64_t kernel_size) {
    TORCH_INTERNAL_ASSERT(kernel_size % 2 == 1);
    const auto dims = static_cast<int64_t>(spatial.size());
    for (const auto s : spatial) {
      pixels *= s;
      taps *= kernel_size;
    }
    const auto centre = (kernel_size - 1) / 2;
    source.resize(static_cast<size_t>(pixels * taps));
    std::vector<int64_t> p_coord(static_cast<size_t>(dims));
    std::vector<int64_t> t_coord(static_cast<size_t>(dims));
    for (int64_t p = 0; p < pixels; ++p) {
      for (int64_t d = dims - 1, rest = p; d >= 0; --d) {
        p_coord[d] = rest % spatial[d];
        rest /= spatial[d];
      }
      for (int64_t t = 0; t < taps; ++t) {
        int64_t q = 0;
        for (int64_t d = dims - 1, rest = t, step = 1; d >= 0; --d) {
          const auto qd = p_coord[d] + rest % kernel_size - centre;
          rest /= kernel_size;
          if (q >= 0 && qd >= 0 && qd < spatial[d]) {
            q += qd * step;
          } else {
            q = -1;
          }
          step *= spatial[d];
        }
        source[static_cast<size_t>(p * taps + t)] = q;
      }
    }
  }
};

// Element offsets of a tensor's pixels (flat index q) within a plane.
std::vector<int64_t> pixel_offsets(const at::Tensor& t) {
  const auto dims = t.dim() - 2;
  int64_t pixels = 1;
  for (int64_t d = 0; d < dims; ++d) {
    pixels *= t.size(2 + d);
  }
  std::vector<int64_t> offsets(static_cast<size_t>(pixels));
  for (int64_t q = 0; q < pixels; ++q) {
    int64_t offset = 0;
    for (int64_t d = dims - 1, rest = q; d >= 0; --d) {
      offset += (rest % t.size(2 + d)) * t.stride(2 + d);
      rest /= t.size(2 + d);
    }
    offsets[static_cast<size_t>(q)] = offset;
  }
  return offsets;
}

// Strides, within a row, of consecutive channels and of consecutive taps.
struct RowSteps {
  int64_t channel;
  int64_t tap;
};

RowSteps row_steps(TapOrder order, int64_t channels, int64_t taps) {
  return order == TapOrder::tap_major ? RowSteps{1, channels} : RowSteps{taps, 1};
}

// Rows per task: about 32K values each.
int64_t grain_for_rows(int64_t row_length) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_length));
}
} // namespace

at::Tensor tap_columns(const at::Tensor& input, int64_t kernel_size, TapOrder order) {
  TORCH_INTERNAL_ASSERT(input.device().is_cpu() && input.dim() >= 3);
  const TapGeometry geometry(input.sizes().slice(2), kernel_size);
  const auto batch = input.size(0);
  const auto channels = input.size(1);
  const auto row_length = channels * geometry.taps;
  auto columns = at::empty({batch * geometry.pixels, row_length}, input.options());
  if (columns.numel() == 0) {
    return columns;
  }
  const auto offsets = pixel_offsets(input);
  const auto steps = row_steps(order, channels, geometry.taps);
  const auto sample_stride = input.stride(0);
  const auto channel_stride = input.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "tap_columns", [&] {
    const auto* in = input.const_data_ptr<scalar_t>();
    auto* cols = columns.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * geometry.pixels, grain_for_rows(row_length), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const auto n = r / geometry.pixels;
        const auto p = r % geometry.pixels;
        auto* row = cols + r * row_length;
        for (int64_t t = 0; t < geometry.taps; ++t) {
          auto* out = row + t * steps.tap;
          const auto q = geometry.source[static_cast<size_t>(p * geometry.taps + t)];
          if (q < 0) {
            for (int64_t c = 0; c < channels; ++c) {
              out[c * steps.channel] = scalar_t(0);
            }
            continue;
          }
          const auto* pixel = in + n * sample_stride + offsets[static_cast<size_t>(q)];
          for (int64_t c = 0; c < channels; ++c) {
            out[c * steps.channel] = pixel[c * channel_stride];
          }
        }
      }
    });
  });
  return columns;
}

void tap_columns_backward(
    const at::Tensor& grad_columns,
    int64_t kernel_size,
    TapOrder order,
    const at::Tensor& grad_input) {
  TORCH_INTERNAL_ASSERT(grad_input.device().is_cpu() && grad_input.dim() >= 3);
  TORCH_INTERNAL_ASSERT(grad_columns.is_contiguous() && grad_columns.scalar_type() == grad_input.scalar_type());
  const TapGeometry geometry(grad_input.sizes().slice(2), kernel_size);
  const auto batch = grad_input.size(0);
  const auto channels = grad_input.size(1);
  const auto row_length = channels * geometry.taps;
  TORCH_INTERNAL_ASSERT(grad_columns.dim() == 2 && grad_columns.size(0) == batch * geometry.pixels &&
                        grad_columns.size(1) == row_length);
  if (grad_input.numel() == 0) {
    return;
  }
  // Each input pixel's readers: offsets p·row_length + t·tap_step into a
  // sample's rows, in increasing p.
  const auto steps = row_steps(order, channels, geometry.taps);
  std::vector<std::vector<int64_t>> readers(static_cast<size_t>(geometry.pixels));
  for (int64_t p = 0; p < geometry.pixels; ++p) {
    for (int64_t t = 0; t < geometry.taps; ++t) {
      const auto q = geometry.source[static_cast<size_t>(p * geometry.taps + t)];
      if (q >= 0) {
        readers[static_cast<size_t>(q)].push_back(p * row_length + t * steps.tap);
      }
    }
  }
  const auto offsets = pixel_offsets(grad_input);
  const auto sample_stride = grad_input.stride(0);
  const auto channel_stride = grad_input.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(), "tap_columns_backward", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const auto* cols = grad_columns.const_data_ptr<scalar_t>();
    auto* out = grad_input.mutable_data_ptr<scalar_t>();
    const auto sample_values = geometry.pixels * row_length;
    at::parallel_for(0, batch * geometry.pixels, grain_for_rows(row_length), [&](int64_t begin, int64_t end) {
      std::vector<math_t> sums(static_cast<size_t>(channels));
      for (int64_t r = begin; r < end; ++r) {
        const auto n = r / geometry.pixels;
        const auto q = r % geometry.pixels;
        std::fill(sums.begin(), sums.end(), math_t(0));
        for (const auto reader : readers[static_cast<size_t>(q)]) {
          const auto* values = cols + n * sample_values + reader;
          for (int64_t c = 0; c < channels; ++c) {
            sums[c] += static_cast<math_t>(values[c * steps.channel]);
          }
        }
        auto* pixel = out + n * sample_stride + offsets[static_cast<size_t>(q)];
        for (int64_t c = 0; c < channels; ++c) {
          pixel[c * channel_stride] = static_cast<scalar_t>(sums[c]);
        }
      }
    });
  });
}

} // namespace densenet_efficient::cpu
