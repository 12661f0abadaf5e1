#include "channel_rows.h"

#include "kernel_common.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace densenet_efficient::cpu {
namespace {

template <typename T>
struct Rows {
  T* data;
  int64_t stride;

  T* row(int64_t r) const {
    return data + r * stride;
  }

  // The rows from channel `c` on (none if there is no data).
  Rows from(int64_t c) const {
    return {data != nullptr ? data + c : nullptr, stride};
  }
};

// The rows of a scalar_t tensor as its raw elements.
template <typename scalar_t>
using ReadRows = Rows<const typename Element<scalar_t>::raw_t>;
template <typename scalar_t>
using WriteRows = Rows<typename Element<scalar_t>::raw_t>;

template <typename scalar_t>
ReadRows<scalar_t> read_rows(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_channel_rows(t));
  return {raw(t.const_data_ptr<scalar_t>()), row_stride(t)};
}

template <typename scalar_t>
WriteRows<scalar_t> write_rows(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_channel_rows(t));
  return {raw(t.mutable_data_ptr<scalar_t>()), row_stride(t)};
}

int64_t rows_of(const at::Tensor& t) {
  return t.size(0) * plane_size(t);
}

// Each channel gets this many values of a chunk, summed in the math type.
constexpr int64_t kRowsPerChunk = kSumBlock;
// Reductions also split the channels into blocks of this many, so that rows
// too few for several chunks (a deep block's small maps) still keep every
// thread busy.
constexpr int64_t kChannelsPerBlock = 128;
// The sums' loops take channels a tile of this many at a time (rows_tiled_sum).
constexpr int64_t kChannelTile = 16;

int64_t chunks_of(int64_t rows) {
  return (rows + kRowsPerChunk - 1) / kRowsPerChunk;
}

// kChannelsPerBlock, halved down to a tile while there are fewer chunks ×
// blocks than threads: a bottleneck's 128 channels over 16×16 maps, batch 8,
// were one item, summed by one thread of two (71 µs for backward's sums
// over [8, 128, 16, 16] fp32 channels-last maps, 29 over NCHW planes).
// Blocks start at multiples of kChannelTile whatever their width, so every
// channel is summed the same way, and the result does not depend on the
// number of threads.
int64_t channels_per_block(int64_t chunks, int64_t channels) {
  int64_t width = kChannelsPerBlock;
  while (width > kChannelTile && chunks * ((channels + width - 1) / width) < at::get_num_threads()) {
    width /= 2;
  }
  return width;
}

// Per chunk of rows and block of channels, `accumulate(rows begin, rows end,
// channels begin, channels end, sums)` adds those channels' values into
// `sums`, the chunk's [`values` · C] math_t (zeroed); the chunks' sums come
// back in double, [`values` · C] added up in chunk order. How each channel is
// summed depends on the shape only: any number of threads gives the same
// result.
template <typename math_t, typename Accumulate>
std::vector<double> chunked_sums(int64_t rows, int64_t channels, int64_t values, const Accumulate& accumulate) {
  const int64_t chunks = chunks_of(rows);
  const int64_t width = channels_per_block(chunks, channels);
  const int64_t blocks = (channels + width - 1) / width;
  std::vector<math_t> partial(static_cast<size_t>(chunks * values * channels));
  const int64_t values_per_item = std::min(rows, kRowsPerChunk) * std::min(channels, width);
  at::parallel_for(0, chunks * blocks, grain_for(values_per_item), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / blocks, b = item % blocks;
      accumulate(
          k * kRowsPerChunk, std::min(rows, (k + 1) * kRowsPerChunk), b * width,
          std::min(channels, (b + 1) * width), &partial[k * values * channels]);
    }
  });
  std::vector<double> total(static_cast<size_t>(values * channels), 0.0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t i = 0; i < values * channels; ++i) {
      total[i] += partial[k * values * channels + i];
    }
  }
  return total;
}

// Each channel's affine form, once.
template <typename math_t>
struct ChannelAffine {
  std::vector<math_t> invstd, scale, shift, mean;

  ChannelAffine(const ChannelVectors& v, int64_t channels, double eps) {
    const auto params = params_of<math_t>(v, eps);
    for (int64_t c = 0; c < channels; ++c) {
      const Affine<math_t> a(params, c);
      invstd.push_back(a.invstd);
      scale.push_back(a.scale);
      shift.push_back(a.shift);
      mean.push_back(a.mean);
    }
  }
};

// The loops over a range of rows [begin, end), each row's channels one
// vectorised run, built for every x86-64 level (DENSENET_VECTORIZED).

// The statistics' sums go through rows a block at a time and, within a
// block, through channels a tile at a time, the tile's sums in registers
// over the block's rows (re-read from cache tile by tile). Summed straight
// into memory, a row of few channels (a layer's k = 32 new ones) paid a
// load and a store of every sum per row: channel_stats over [8, 32, 32, 32]
// fp32 channels-last maps took 83 µs against 20 over NCHW planes. Tiles
// over whole chunks of rows instead of blocks made wide rows (a bottleneck's
// 128 channels) slower. Backward's sums go the same way.
constexpr int64_t kRowBlock = 64;

// sum[c] += term(x[r][c], c) over rows [begin, end).
template <typename scalar_t, typename math_t, typename Term>
DENSENET_VECTORIZED void rows_tiled_sum(
    ReadRows<scalar_t> x,
    int64_t begin,
    int64_t end,
    int64_t channels,
    math_t* sum,
    const Term& term) {
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t r1 = std::min(end, r0 + kRowBlock);
    int64_t c0 = 0;
    for (; c0 + kChannelTile <= channels; c0 += kChannelTile) {
      math_t tile[kChannelTile] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const auto* xr = x.row(r) + c0;
#pragma omp simd
        for (int64_t j = 0; j < kChannelTile; ++j) {
          tile[j] += term(xr[j], c0 + j);
        }
      }
      for (int64_t j = 0; j < kChannelTile; ++j) {
        sum[c0 + j] += tile[j];
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      const auto* xr = x.row(r);
#pragma omp simd
      for (int64_t c = c0; c < channels; ++c) {
        sum[c] += term(xr[c], c);
      }
    }
  }
}

// sum[c] += x[r][c].
template <typename scalar_t, typename math_t>
void rows_sum(ReadRows<scalar_t> x, int64_t begin, int64_t end, int64_t channels, math_t* sum) {
  rows_tiled_sum<scalar_t>(
      x, begin, end, channels, sum, [](auto v, int64_t) -> math_t { return Element<scalar_t>::load(v); });
}

// sum[c] += (x[r][c] − mean[c])².
template <typename scalar_t, typename math_t>
void rows_squared_deviations(
    ReadRows<scalar_t> x,
    int64_t begin,
    int64_t end,
    int64_t channels,
    const math_t* mean,
    math_t* sum) {
  rows_tiled_sum<scalar_t>(x, begin, end, channels, sum, [mean](auto v, int64_t c) -> math_t {
    const math_t d = Element<scalar_t>::load(v) - mean[c];
    return d * d;
  });
}

// sum_g[c] += g and sum_g_centered[c] += g·(x − μ), g the gradient through
// the ReLU gate; with `writes`, fixed statistics' input gradient dx = scale·g
// too, written or (`accumulate`) added, in the same pass.
template <bool writes, bool accumulate, typename scalar_t, typename math_t>
DENSENET_VECTORIZED void rows_grad_sums(
    ReadRows<scalar_t> dy,
    ReadRows<scalar_t> x,
    WriteRows<scalar_t> dx,
    int64_t begin,
    int64_t end,
    int64_t channels,
    const math_t* scale,
    const math_t* shift,
    const math_t* mean,
    math_t* sum_g,
    math_t* sum_g_centered) {
  using E = Element<scalar_t>;
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t r1 = std::min(end, r0 + kRowBlock);
    int64_t c0 = 0;
    for (; c0 + kChannelTile <= channels; c0 += kChannelTile) {
      math_t g_tile[kChannelTile] = {}, gc_tile[kChannelTile] = {};
      for (int64_t r = r0; r < r1; ++r) {
        const auto* xr = x.row(r) + c0;
        const auto* dyr = dy.row(r) + c0;
        auto* dxr = writes ? dx.row(r) + c0 : nullptr;
#pragma omp simd
        for (int64_t j = 0; j < kChannelTile; ++j) {
          const math_t v = E::load(xr[j]);
          const math_t g = gated<scalar_t>(E::load(dyr[j]), v, scale[c0 + j], shift[c0 + j]);
          g_tile[j] += g;
          gc_tile[j] += g * (v - mean[c0 + j]);
          if constexpr (writes) {
            math_t d = scale[c0 + j] * g;
            if constexpr (accumulate) {
              d += E::load(dxr[j]);
            }
            dxr[j] = E::store(d);
          }
        }
      }
      for (int64_t j = 0; j < kChannelTile; ++j) {
        sum_g[c0 + j] += g_tile[j];
        sum_g_centered[c0 + j] += gc_tile[j];
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      const auto* xr = x.row(r);
      const auto* dyr = dy.row(r);
      auto* dxr = writes ? dx.row(r) : nullptr;
#pragma omp simd
      for (int64_t c = c0; c < channels; ++c) {
        const math_t v = E::load(xr[c]);
        const math_t g = gated<scalar_t>(E::load(dyr[c]), v, scale[c], shift[c]);
        sum_g[c] += g;
        sum_g_centered[c] += g * (v - mean[c]);
        if constexpr (writes) {
          math_t d = scale[c] * g;
          if constexpr (accumulate) {
            d += E::load(dxr[c]);
          }
          dxr[c] = E::store(d);
        }
      }
    }
  }
}

// dx = scale·(g − mean_g − (x − μ)·centered_coef), written or added.
template <bool accumulate, typename scalar_t, typename math_t>
DENSENET_VECTORIZED void rows_grad_input(
    ReadRows<scalar_t> dy,
    ReadRows<scalar_t> x,
    WriteRows<scalar_t> dx,
    int64_t begin,
    int64_t end,
    int64_t channels,
    const math_t* scale,
    const math_t* shift,
    const math_t* mean,
    const math_t* mean_g,
    const math_t* centered_coef) {
  using E = Element<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const auto* xr = x.row(r);
    const auto* dyr = dy.row(r);
    auto* dxr = dx.row(r);
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const math_t v = E::load(xr[c]);
      const math_t g = gated<scalar_t>(E::load(dyr[c]), v, scale[c], shift[c]);
      math_t d = scale[c] * (g - mean_g[c] - (v - mean[c]) * centered_coef[c]);
      if constexpr (accumulate) {
        d += E::load(dxr[c]);
      }
      dxr[c] = E::store(d);
    }
  }
}

// relu(x·scale + shift); NaN stays NaN, as torch.relu.
template <typename scalar_t, typename math_t>
DENSENET_VECTORIZED void rows_bn_relu(
    ReadRows<scalar_t> x,
    WriteRows<scalar_t> y,
    int64_t begin,
    int64_t end,
    int64_t channels,
    const math_t* scale,
    const math_t* shift) {
  using E = Element<scalar_t>;
  for (int64_t r = begin; r < end; ++r) {
    const auto* xr = x.row(r);
    auto* yr = y.row(r);
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const math_t v = E::load(xr[c]) * scale[c] + shift[c];
      yr[c] = E::store(v < 0 ? math_t(0) : v);
    }
  }
}

template <typename scalar_t>
void channel_stats_impl(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var) {
  using math_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows_of(input), channels = input.size(1);
  const auto x = read_rows<scalar_t>(input);
  const auto sums = chunked_sums<math_t>(
      rows, channels, 1, [&](int64_t begin, int64_t end, int64_t c0, int64_t c1, math_t* sum) {
    rows_sum<scalar_t>(x.from(c0), begin, end, c1 - c0, sum + c0);
  });
  std::vector<math_t> m(static_cast<size_t>(channels));
  for (int64_t c = 0; c < channels; ++c) {
    m[c] = static_cast<math_t>(sums[c] / rows);
  }
  // Second pass over deviations from the mean: no cancellation between large sums.
  const auto squares = chunked_sums<math_t>(
      rows, channels, 1, [&](int64_t begin, int64_t end, int64_t c0, int64_t c1, math_t* sum) {
    rows_squared_deviations<scalar_t>(x.from(c0), begin, end, c1 - c0, m.data() + c0, sum + c0);
  });
  auto* mean_out = mean.mutable_data_ptr<math_t>();
  auto* var_out = var.mutable_data_ptr<math_t>();
  for (int64_t c = 0; c < channels; ++c) {
    mean_out[c] = m[c];
    var_out[c] = static_cast<math_t>(squares[c] / rows);
  }
}

// Σg and Σg·(x − μ) per channel (g: the gradient through the ReLU gate), in
// double: [C] each.
template <typename scalar_t, typename math_t>
std::pair<std::vector<double>, std::vector<double>> grad_sums_impl(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelAffine<math_t>& a) {
  const int64_t rows = rows_of(input), channels = input.size(1);
  const auto x = read_rows<scalar_t>(input);
  const auto dy = read_rows<scalar_t>(grad_output);
  const auto sums = chunked_sums<math_t>(
      rows, channels, 2, [&](int64_t begin, int64_t end, int64_t c0, int64_t c1, math_t* sum) {
    rows_grad_sums<false, false, scalar_t>(
        dy.from(c0), x.from(c0), WriteRows<scalar_t>{}, begin, end, c1 - c0, a.scale.data() + c0,
        a.shift.data() + c0, a.mean.data() + c0, sum + c0, sum + channels + c0);
  });
  return {std::vector<double>(sums.begin(), sums.begin() + channels),
          std::vector<double>(sums.begin() + channels, sums.end())};
}

// dx = scale·g, written or added, and Σg, Σg·(x − μ) per channel (as
// grad_sums_impl sums them, in the same order), in one pass: [Σg · C,
// Σg·(x − μ) · C] in double.
template <typename scalar_t, typename math_t>
std::vector<double> fixed_stats_backward_impl(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelAffine<math_t>& a,
    bool accumulate,
    const at::Tensor& grad_input) {
  const int64_t rows = rows_of(input), channels = input.size(1);
  const auto x = read_rows<scalar_t>(input);
  const auto dy = read_rows<scalar_t>(grad_output);
  const auto dx = write_rows<scalar_t>(grad_input);
  const auto loop =
      accumulate ? &rows_grad_sums<true, true, scalar_t, math_t> : &rows_grad_sums<true, false, scalar_t, math_t>;
  return chunked_sums<math_t>(rows, channels, 2, [&](int64_t begin, int64_t end, int64_t c0, int64_t c1, math_t* sum) {
    loop(
        dy.from(c0), x.from(c0), dx.from(c0), begin, end, c1 - c0, a.scale.data() + c0, a.shift.data() + c0,
        a.mean.data() + c0, sum + c0, sum + channels + c0);
  });
}

// dx = scale·(g − mean_g − (x − μ)·centered_coef) per channel, written or added.
template <typename scalar_t, typename math_t>
void grad_input_impl(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelAffine<math_t>& a,
    const std::vector<math_t>& mean_g,
    const std::vector<math_t>& centered_coef,
    bool accumulate,
    const at::Tensor& grad_input) {
  const int64_t rows = rows_of(input), channels = input.size(1);
  const auto x = read_rows<scalar_t>(input);
  const auto dy = read_rows<scalar_t>(grad_output);
  const auto dx = write_rows<scalar_t>(grad_input);
  const auto loop = accumulate ? &rows_grad_input<true, scalar_t, math_t> : &rows_grad_input<false, scalar_t, math_t>;
  at::parallel_for(0, rows, grain_for(channels), [&](int64_t begin, int64_t end) {
    loop(dy, x, dx, begin, end, channels, a.scale.data(), a.shift.data(), a.mean.data(), mean_g.data(),
         centered_coef.data());
  });
}

template <typename scalar_t>
void bn_relu_impl(const at::Tensor& input, const ChannelVectors& vectors, double eps, const at::Tensor& out) {
  using math_t = at::opmath_type<scalar_t>;
  const int64_t rows = rows_of(input), channels = input.size(1);
  const ChannelAffine<math_t> a(vectors, channels, eps);
  const auto x = read_rows<scalar_t>(input);
  const auto y = write_rows<scalar_t>(out);
  at::parallel_for(0, rows, grain_for(channels), [&](int64_t begin, int64_t end) {
    rows_bn_relu<scalar_t>(x, y, begin, end, channels, a.scale.data(), a.shift.data());
  });
}

} // namespace

void ChannelRowKernels::channel_stats_rows(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_stats_rows_cpu", [&] {
    channel_stats_impl<scalar_t>(input, mean, var);
  });
}

void ChannelRowKernels::copy_with_stats_rows(
    const at::Tensor& source,
    const at::Tensor& destination,
    const at::Tensor& mean,
    const at::Tensor& var) {
  // ATen's copy, then the statistics: the destination, a channel slice of a
  // block's buffer, has rows far apart, and a copy inside the statistics'
  // walk took [8, 32, 32, 32] fp32 channels-last maps 300 µs (190 with the
  // tiled sums), these two 100.
  destination.copy_(source);
  channel_stats_rows(source, mean, var);
}

void ChannelRowKernels::bn_relu_rows(const at::Tensor& input, const ChannelVectors& vectors, double eps, const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_rows_cpu", [&] {
    bn_relu_impl<scalar_t>(input, vectors, eps, out);
  });
}

void ChannelRowKernels::backward_rows(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelVectors& vectors,
    double eps,
    bool batch_stats,
    bool accumulate,
    const at::Tensor& grad_input,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_rows_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const int64_t channels = input.size(1);
    const double count = static_cast<double>(rows_of(input));
    const ChannelAffine<math_t> a(vectors, channels, eps);
    auto* dw = grad_weight.mutable_data_ptr<math_t>();
    auto* db = grad_bias.mutable_data_ptr<math_t>();
    if (!batch_stats) {  // dx = scale·g needs no sums first: one pass
      const auto sums = fixed_stats_backward_impl<scalar_t>(grad_output, input, a, accumulate, grad_input);
      for (int64_t c = 0; c < channels; ++c) {
        const ChannelBackward<math_t> terms(sums[c], sums[channels + c], a.invstd[c], false, 0);
        dw[c] = terms.grad_weight;
        db[c] = terms.grad_bias;
      }
      return;
    }
    const auto [sum_g, sum_g_centered] = grad_sums_impl<scalar_t>(grad_output, input, a);
    std::vector<math_t> mean_g(channels), centered_coef(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const ChannelBackward<math_t> terms(sum_g[c], sum_g_centered[c], a.invstd[c], batch_stats, count);
      dw[c] = terms.grad_weight;
      db[c] = terms.grad_bias;
      mean_g[c] = terms.mean_g;
      centered_coef[c] = terms.centered_coef;
    }
    grad_input_impl<scalar_t>(grad_output, input, a, mean_g, centered_coef, accumulate, grad_input);
  });
}

void ChannelRowKernels::grad_sums_rows(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelVectors& vectors,
    double eps,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_sums_rows_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const ChannelAffine<math_t> a(vectors, input.size(1), eps);
    const auto [sum_g, sum_g_centered] = grad_sums_impl<scalar_t>(grad_output, input, a);
    auto* dw = grad_weight.mutable_data_ptr<math_t>();
    auto* db = grad_bias.mutable_data_ptr<math_t>();
    for (int64_t c = 0; c < input.size(1); ++c) {
      const ChannelBackward<math_t> terms(sum_g[c], sum_g_centered[c], a.invstd[c], /*batch_stats=*/false, 0);
      dw[c] = terms.grad_weight;
      db[c] = terms.grad_bias;
    }
  });
}

void ChannelRowKernels::grad_input_rows(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelVectors& vectors,
    double eps,
    const AffineGradients& sums,
    const at::Tensor& count,
    bool accumulate,
    const at::Tensor& grad_input) {
  const double values = static_cast<double>(count.const_data_ptr<int64_t>()[0]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_input_rows_cpu", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const int64_t channels = input.size(1);
    const ChannelAffine<math_t> a(vectors, channels, eps);
    const auto* dw = sums.weight.const_data_ptr<math_t>();
    const auto* db = sums.bias.const_data_ptr<math_t>();
    std::vector<math_t> mean_g(channels), centered_coef(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const ChannelBackward<math_t> terms(dw[c], db[c], a.invstd[c], values);
      mean_g[c] = terms.mean_g;
      centered_coef[c] = terms.centered_coef;
    }
    grad_input_impl<scalar_t>(grad_output, input, a, mean_g, centered_coef, accumulate, grad_input);
  });
}

} // namespace densenet_efficient::cpu
