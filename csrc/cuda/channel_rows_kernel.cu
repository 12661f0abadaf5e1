#include "bn_relu_math.cuh"
#include "channel_rows.h"
#include "launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <utility>

namespace densenet_efficient::gpu {
namespace {

using launch::kRowTileChannels;
using launch::kRowTileRows;
static_assert(kRowTileChannels * kRowTileRows == kThreads, "a row tile is one block of threads");
static_assert(kRowTileChannels == kWarpSize, "a warp reads one row's consecutive channels");

template <typename T>
struct Rows {
  T* data;
  int64_t stride;

  __device__ T* at(int64_t row, int64_t c) const {
    return data + row * stride + c;
  }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_channel_rows(t));
  return {data_of<T>(t), row_stride(t)};
}

int64_t row_count(const at::Tensor& t) {
  return t.size(0) * plane_size(t);
}

dim3 row_tile() {
  return {kRowTileChannels, kRowTileRows};
}

// ---------------------------------------------------------------------------
// The two kernel shapes. An Op or Reducer has channel(c): what is constant
// over a channel, formed once per thread.

// Elementwise: op(channel(c), row, c) for every value; each thread keeps one
// channel and steps over rows a grid's height apart.
template <typename Op>
__global__ void __launch_bounds__(kThreads) for_each_row_value_kernel(int64_t rows, int64_t channels, Op op) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowTileChannels + threadIdx.x;
  if (c >= channels) {
    return;
  }
  const auto channel = op.channel(c);
  const int64_t step = static_cast<int64_t>(gridDim.y) * kRowTileRows;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * kRowTileRows + threadIdx.y; row < rows; row += step) {
    op(channel, row, c);
  }
}

template <typename Op>
void launch_for_each_row_value(const at::Tensor& like, const Op& op) {
  const int64_t rows = row_count(like), channels = like.size(1);
  const auto plan = launch::plan_rows(rows, channels, /*reduction=*/false, multiprocessors(like));
  const dim3 grid(static_cast<unsigned>(plan.channel_tiles), static_cast<unsigned>(plan.row_blocks));
  for_each_row_value_kernel<Op><<<grid, row_tile(), 0, c10::cuda::getCurrentCUDAStream()>>>(rows, channels, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block (tile, s) reduces rows [s·chunk, (s+1)·chunk) of its channels: each
// thread every kRowTileRows-th row of the chunk, then the tile's rows of
// threads merged in order into partials[c·S + s].
template <typename Reducer>
__global__ void __launch_bounds__(kThreads) reduce_row_chunks_kernel(
    int64_t rows,
    int64_t channels,
    int64_t chunk,
    Reducer reducer,
    typename Reducer::Reduction::State* partials) {
  using Reduction = typename Reducer::Reduction;
  using State = typename Reduction::State;
  __shared__ State tile[kRowTileRows][kRowTileChannels];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRowTileChannels + threadIdx.x;
  auto state = Reduction::identity();
  if (c < channels) {
    const auto channel = reducer.channel(c);
    const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk;
    const int64_t end = begin + chunk < rows ? begin + chunk : rows;
    for (int64_t row = begin + threadIdx.y; row < end; row += kRowTileRows) {
      reducer.accumulate(state, channel, row, c);
    }
  }
  tile[threadIdx.y][threadIdx.x] = state;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int i = 1; i < kRowTileRows; ++i) {
      state = Reduction::merge(state, tile[i][threadIdx.x]);
    }
    partials[c * gridDim.y + blockIdx.y] = state;
  }
}

// The partials ([C·S] states, as bytes) and the number S of chunks.
template <typename Reducer>
std::pair<at::Tensor, int64_t> launch_reduce_row_chunks(const at::Tensor& like, const Reducer& reducer) {
  using State = typename Reducer::Reduction::State;
  const int64_t rows = row_count(like), channels = like.size(1);
  const auto plan = launch::plan_rows(rows, channels, /*reduction=*/true, multiprocessors(like));
  auto partials = at::empty(
      {channels * plan.row_blocks * static_cast<int64_t>(sizeof(State))}, like.options().dtype(at::kByte));
  const dim3 grid(static_cast<unsigned>(plan.channel_tiles), static_cast<unsigned>(plan.row_blocks));
  reduce_row_chunks_kernel<Reducer><<<grid, row_tile(), 0, c10::cuda::getCurrentCUDAStream()>>>(
      rows, channels, plan.chunk, reducer, reinterpret_cast<State*>(partials.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {partials, plan.row_blocks};
}

// ---------------------------------------------------------------------------
// Statistics (Welford), of the input or of what is copied.

template <typename scalar_t, bool copy>
struct RowStats {
  using Reduction = WelfordReduction<at::opmath_type<scalar_t>>;
  Rows<const scalar_t> x;
  Rows<scalar_t> destination;  // written when `copy`

  __device__ int64_t channel(int64_t c) const {
    return c;
  }
  __device__ void accumulate(typename Reduction::State& state, int64_t, int64_t row, int64_t c) const {
    const Pack<scalar_t, 1> value{{*x.at(row, c)}};
    if constexpr (copy) {
      *destination.at(row, c) = value.v[0];
    }
    Reduction::template add<1>(state, value);
  }
};

template <bool copy>
void stats_rows(const at::Tensor& input, const at::Tensor* destination, const at::Tensor& mean, const at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_stats_rows_cuda", [&] {
    const RowStats<scalar_t, copy> reducer{
        rows_of<const scalar_t>(input), copy ? rows_of<scalar_t>(*destination) : Rows<scalar_t>{nullptr, 0}};
    launch_finalize_stats<at::opmath_type<scalar_t>>(launch_reduce_row_chunks(input, reducer), mean, var);
  });
}

// ---------------------------------------------------------------------------
// bn_relu: out = max(0, x·scale + shift).

template <typename scalar_t>
struct RowBnRelu {
  using math_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> x;
  Rows<scalar_t> out;
  ChannelParams<math_t> params;

  __device__ Affine<math_t> channel(int64_t c) const {
    return affine_of(params, c);
  }
  __device__ void operator()(const Affine<math_t>& affine, int64_t row, int64_t c) const {
    *out.at(row, c) = static_cast<scalar_t>(relu(affine(static_cast<math_t>(*x.at(row, c)))));
  }
};

// ---------------------------------------------------------------------------
// Backward (derived in bn_relu_math.cuh): pass 1's sums, pass 2.

template <typename scalar_t>
struct RowGradSums {
  using math_t = at::opmath_type<scalar_t>;
  using Reduction = GradSumsReduction<math_t>;
  Rows<const scalar_t> grad_out;
  Rows<const scalar_t> x;
  ChannelParams<math_t> params;

  __device__ GradChannel<math_t> channel(int64_t c) const {
    return {c, affine_of(params, c), params.mean[c]};
  }
  __device__ void accumulate(
      GradSums<math_t>& state,
      const GradChannel<math_t>& ch,
      int64_t row,
      int64_t c) const {
    const math_t v = static_cast<math_t>(*x.at(row, c));
    const math_t g = gated<scalar_t>(static_cast<math_t>(*grad_out.at(row, c)), ch.affine(v));
    state.g += g;
    state.g_centered += g * (v - ch.mean);
  }
};

template <typename scalar_t, bool accumulate>
struct RowGradInput {
  using math_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> grad_out;
  Rows<const scalar_t> x;
  Rows<scalar_t> grad_in;
  const GradCoefficients<math_t>* coefficients;

  __device__ GradCoefficients<math_t> channel(int64_t c) const {
    return coefficients[c];
  }
  __device__ void operator()(const GradCoefficients<math_t>& k, int64_t row, int64_t c) const {
    const math_t v = static_cast<math_t>(*x.at(row, c));
    const math_t g = gated<scalar_t>(static_cast<math_t>(*grad_out.at(row, c)), k.affine(v));
    math_t d = k.affine.scale * (g - k.mean_g - (v - k.mean) * k.centered_coef);
    scalar_t* target = grad_in.at(row, c);
    if constexpr (accumulate) {
      d += static_cast<math_t>(*target);
    }
    *target = static_cast<scalar_t>(d);
  }
};

// Backward's passes along channel rows (bn_relu_math.cuh, Backward).
struct RowWalk {
  template <typename scalar_t>
  static std::pair<at::Tensor, int64_t> grad_sums(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelParams<at::opmath_type<scalar_t>>& params) {
    return launch_reduce_row_chunks(
        input, RowGradSums<scalar_t>{rows_of<const scalar_t>(grad_output), rows_of<const scalar_t>(input), params});
  }

  template <typename scalar_t, bool accumulate>
  static void grad_input(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const at::Tensor& grad_input,
      const GradCoefficients<at::opmath_type<scalar_t>>* coefficients) {
    launch_for_each_row_value(
        input, RowGradInput<scalar_t, accumulate>{
                   rows_of<const scalar_t>(grad_output), rows_of<const scalar_t>(input),
                   rows_of<scalar_t>(grad_input), coefficients});
  }
};

} // namespace

void ChannelRowKernels::channel_stats_rows(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var) {
  stats_rows<false>(input, nullptr, mean, var);
}

void ChannelRowKernels::copy_with_stats_rows(
    const at::Tensor& source,
    const at::Tensor& destination,
    const at::Tensor& mean,
    const at::Tensor& var) {
  stats_rows<true>(source, &destination, mean, var);
}

void ChannelRowKernels::bn_relu_rows(
    const at::Tensor& input,
    const ChannelVectors& vectors,
    double eps,
    const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_rows_cuda", [&] {
    launch_for_each_row_value(
        input, RowBnRelu<scalar_t>{
                   rows_of<const scalar_t>(input), rows_of<scalar_t>(out),
                   params_of<at::opmath_type<scalar_t>>(vectors, eps)});
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_rows_cuda", [&] {
    if (accumulate) {
      Backward<RowWalk>::both<scalar_t, true>(
          grad_output, input, vectors, eps, batch_stats, grad_input, grad_weight, grad_bias);
    } else {
      Backward<RowWalk>::both<scalar_t, false>(
          grad_output, input, vectors, eps, batch_stats, grad_input, grad_weight, grad_bias);
    }
  });
}

void ChannelRowKernels::grad_sums_rows(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelVectors& vectors,
    double eps,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_sums_rows_cuda", [&] {
    Backward<RowWalk>::grad_sums<scalar_t>(
        grad_output, input, vectors, eps, /*batch_stats=*/false, grad_weight, grad_bias, nullptr);
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_input_rows_cuda", [&] {
    if (accumulate) {
      Backward<RowWalk>::grad_input_from_sums<scalar_t, true>(
          grad_output, input, vectors, eps, sums, count, grad_input);
    } else {
      Backward<RowWalk>::grad_input_from_sums<scalar_t, false>(
          grad_output, input, vectors, eps, sums, count, grad_input);
    }
  });
}

} // namespace densenet_efficient::gpu
