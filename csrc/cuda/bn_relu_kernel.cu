// CUDA kernels of the per-channel operators of the efficient dense block:
// channel statistics, fused BatchNorm+ReLU forward and its backward.
//
// Layout: [N, C, H, W] tensors whose H×W planes are contiguous (the block
// buffer, channel slices of it, NCHW scratches); plane p = (n, c) starts at
// n * stride_n + c * stride_c. Elementwise kernels walk every plane in
// vectors of 16 bytes where sizes and alignment allow (else one element).
// Per-channel reductions split each channel's N·H·W values into S chunks, one
// block per (channel, chunk); blocks write partial results in a fixed order
// and a small finalize kernel merges them, so results are deterministic (no
// atomics). Arithmetic is in the math type: float for half/bfloat16/float,
// double for double.
#include "../bn_relu_common.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>

namespace densenet_efficient {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kBytesPerVector = 16;

int multiprocessor_count(c10::DeviceIndex device) {
  static std::array<int, 64> cached{};  // benign race: every writer writes the same value
  int& count = cached.at(device);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  }
  return count;
}

template <typename T>
struct Planes {
  T* data;
  int64_t stride_n;
  int64_t stride_c;

  __device__ T* plane(int64_t n, int64_t c) const {
    return data + n * stride_n + c * stride_c;
  }
};

template <typename T>
Planes<T> planes_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_contiguous_planes(t));
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1)};
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VEC> load(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store(scalar_t* p, const Pack<scalar_t, VEC>& pack) {
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pack;
}

// The widest vector every tensor allows: planes of a multiple of its length,
// 16-byte aligned bases and strides.
template <typename scalar_t>
int vector_width(int64_t plane_size, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int wide = kBytesPerVector / sizeof(scalar_t);
  if (plane_size % wide != 0) {
    return 1;
  }
  for (const auto* t : tensors) {
    const bool aligned = reinterpret_cast<uintptr_t>(t->data_ptr()) % kBytesPerVector == 0 &&
        t->stride(0) % wide == 0 && t->stride(1) % wide == 0;
    if (!aligned) {
      return 1;
    }
  }
  return wide;
}

bool fits_int32(int64_t n) {
  return n <= std::numeric_limits<int32_t>::max();
}

// ---------------------------------------------------------------------------
// Elementwise over all planes. `Op` is called with (n, c, offset in plane) of
// one vector.

template <typename index_t, typename Op>
__global__ void __launch_bounds__(kThreads) for_each_vector_kernel(
    index_t total_vectors,
    index_t vectors_per_plane,
    index_t channels,
    Op op) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       v < total_vectors; v += step) {
    const index_t p = v / vectors_per_plane;
    const index_t j = v - p * vectors_per_plane;
    const index_t n = p / channels;
    const index_t c = p - n * channels;
    op(n, c, static_cast<int64_t>(j) * Op::kVec);
  }
}

template <typename Op>
void launch_for_each_vector(int64_t batch, int64_t channels, int64_t plane_size, const Op& op, c10::DeviceIndex device) {
  const int64_t vectors_per_plane = plane_size / Op::kVec;
  const int64_t total = batch * channels * vectors_per_plane;
  const int64_t blocks = std::min<int64_t>(
      (total + kThreads - 1) / kThreads, int64_t{multiprocessor_count(device)} * 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (fits_int32(total)) {
    for_each_vector_kernel<int32_t><<<blocks, kThreads, 0, stream>>>(
        static_cast<int32_t>(total), static_cast<int32_t>(vectors_per_plane),
        static_cast<int32_t>(channels), op);
  } else {
    for_each_vector_kernel<int64_t><<<blocks, kThreads, 0, stream>>>(
        total, vectors_per_plane, channels, op);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// Per-channel reductions. A Reducer has State (merged across threads by
// shuffles, across chunks by finalize), identity(), accumulate(state, n, c,
// offset) for one vector and merge(a, b).

template <typename State, typename Reducer>
__device__ State block_reduce(State state, const Reducer& reducer) {
  __shared__ State warp_results[kThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    state = reducer.merge(state, Reducer::shuffle_down(state, offset));
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    warp_results[warp] = state;
  }
  __syncthreads();
  if (warp == 0) {
    state = lane < static_cast<int>(blockDim.x / kWarpSize) ? warp_results[lane] : reducer.identity();
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      state = reducer.merge(state, Reducer::shuffle_down(state, offset));
    }
  }
  return state;
}

// Block (c, s) reduces vectors [s·chunk, (s+1)·chunk) of channel c's
// batch·vectors_per_plane vectors into partials[c·S + s].
template <typename index_t, typename Reducer>
__global__ void __launch_bounds__(kThreads) reduce_chunks_kernel(
    index_t vectors_per_channel,
    index_t vectors_per_plane,
    index_t chunk,
    Reducer reducer,
    typename Reducer::State* partials) {
  const index_t c = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = begin + chunk < vectors_per_channel ? begin + chunk : vectors_per_channel;
  auto state = reducer.identity();
  for (index_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
    const index_t n = v / vectors_per_plane;
    const index_t j = v - n * vectors_per_plane;
    reducer.accumulate(state, n, c, static_cast<int64_t>(j) * Reducer::kVec);
  }
  state = block_reduce(state, reducer);
  if (threadIdx.x == 0) {
    partials[static_cast<int64_t>(c) * gridDim.y + blockIdx.y] = state;
  }
}

struct ChunkPlan {
  int64_t chunks;  // S per channel
  int64_t chunk;   // vectors per chunk
};

// Enough blocks to fill the GPU a few times over, none with too little work.
ChunkPlan plan_chunks(int64_t channels, int64_t vectors_per_channel, c10::DeviceIndex device) {
  const int64_t target_blocks = int64_t{multiprocessor_count(device)} * 4;
  const int64_t min_chunk = kThreads * 4;
  int64_t chunks = std::max<int64_t>(1, (target_blocks + channels - 1) / channels);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, vectors_per_channel / min_chunk));
  chunks = std::min<int64_t>(chunks, 65535);  // gridDim.y
  const int64_t chunk = (vectors_per_channel + chunks - 1) / chunks;
  return {chunks, std::max<int64_t>(chunk, 1)};
}

template <typename Reducer>
at::Tensor launch_reduce_chunks(
    int64_t batch,
    int64_t channels,
    int64_t plane_size,
    const Reducer& reducer,
    const at::Tensor& like,
    ChunkPlan& plan) {
  using State = typename Reducer::State;
  const int64_t vectors_per_plane = plane_size / Reducer::kVec;
  const int64_t vectors_per_channel = batch * vectors_per_plane;
  const auto device = like.device().index();
  plan = plan_chunks(channels, vectors_per_channel, device);
  auto partials = at::empty(
      {channels * plan.chunks * static_cast<int64_t>(sizeof(State))},
      like.options().dtype(at::kByte));
  const dim3 grid(channels, plan.chunks);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* out = reinterpret_cast<State*>(partials.data_ptr());
  if (fits_int32(vectors_per_channel + plan.chunk)) {
    reduce_chunks_kernel<int32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<int32_t>(vectors_per_channel), static_cast<int32_t>(vectors_per_plane),
        static_cast<int32_t>(plan.chunk), reducer, out);
  } else {
    reduce_chunks_kernel<int64_t><<<grid, kThreads, 0, stream>>>(
        vectors_per_channel, vectors_per_plane, plan.chunk, reducer, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partials;
}

int64_t finalize_blocks(int64_t channels) {
  return (channels + kThreads - 1) / kThreads;
}

// ---------------------------------------------------------------------------
// channel_stats: Welford per thread (each vector's own mean and M2 merged in
// with Chan's formula: one division per vector), Chan merges across threads
// and chunks.

template <typename math_t>
struct Welford {
  int64_t count;
  math_t mean;
  math_t m2;
};

template <typename math_t>
__device__ Welford<math_t> chan_merge(const Welford<math_t>& a, const Welford<math_t>& b) {
  const int64_t count = a.count + b.count;
  if (count == 0) {
    return a;
  }
  const math_t delta = b.mean - a.mean;
  const math_t b_share = static_cast<math_t>(b.count) / static_cast<math_t>(count);
  return {
      count, a.mean + delta * b_share,
      a.m2 + b.m2 + delta * delta * static_cast<math_t>(a.count) * b_share};
}

template <typename scalar_t, typename math_t, int VEC>
struct StatsReducer {
  static constexpr int kVec = VEC;
  using State = Welford<math_t>;
  Planes<const scalar_t> x;

  __device__ State identity() const {
    return {0, 0, 0};
  }
  __device__ State merge(const State& a, const State& b) const {
    return chan_merge(a, b);
  }
  __device__ static State shuffle_down(const State& s, int offset) {
    return {
        __shfl_down_sync(0xffffffff, s.count, offset),
        __shfl_down_sync(0xffffffff, s.mean, offset),
        __shfl_down_sync(0xffffffff, s.m2, offset)};
  }
  __device__ void accumulate(State& state, int64_t n, int64_t c, int64_t offset) const {
    const auto pack = load<VEC>(x.plane(n, c) + offset);
    math_t values[VEC];
    math_t sum = 0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      values[i] = static_cast<math_t>(pack.v[i]);
      sum += values[i];
    }
    const math_t mean = sum / VEC;
    math_t m2 = 0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      m2 += (values[i] - mean) * (values[i] - mean);
    }
    state = chan_merge(state, State{VEC, mean, m2});
  }
};

template <typename math_t>
__global__ void finalize_stats_kernel(
    const Welford<math_t>* partials,
    int64_t channels,
    int64_t chunks,
    math_t* mean,
    math_t* var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) {
    return;
  }
  Welford<math_t> total{0, 0, 0};
  for (int64_t s = 0; s < chunks; ++s) {
    total = chan_merge(total, partials[c * chunks + s]);
  }
  mean[c] = total.mean;
  var[c] = total.m2 / static_cast<math_t>(total.count);
}

template <typename scalar_t, int VEC>
void channel_stats_launch(const at::Tensor& input, at::Tensor& mean, at::Tensor& var) {
  using math_t = at::opmath_type<scalar_t>;
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t plane_size = input.size(2) * input.size(3);
  StatsReducer<scalar_t, math_t, VEC> reducer{planes_of<const scalar_t>(input)};
  ChunkPlan plan{};
  auto partials = launch_reduce_chunks(batch, channels, plane_size, reducer, input, plan);
  finalize_stats_kernel<math_t><<<finalize_blocks(channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const Welford<math_t>*>(partials.data_ptr()), channels, plan.chunks,
      mean.mutable_data_ptr<math_t>(), var.mutable_data_ptr<math_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// bn_relu: out = max(0, x·scale + shift), scale = γ·invstd, shift = β − μ·scale
// (ATen's affine form); NaN stays NaN, as torch.relu.

template <typename math_t>
struct ChannelAffine {
  const math_t* mean;
  const math_t* invstd;
  const math_t* weight;
  const math_t* bias;

  __device__ void scale_shift(int64_t c, math_t& scale, math_t& shift) const {
    scale = weight[c] * invstd[c];
    shift = bias[c] - mean[c] * scale;
  }
};

template <typename math_t>
__device__ __forceinline__ math_t relu(math_t y) {
  return y < 0 ? math_t(0) : y;
}

template <typename scalar_t, typename math_t, int VEC>
struct BnReluForward {
  static constexpr int kVec = VEC;
  Planes<const scalar_t> x;
  Planes<scalar_t> out;
  ChannelAffine<math_t> affine;

  __device__ void operator()(int64_t n, int64_t c, int64_t offset) const {
    math_t scale, shift;
    affine.scale_shift(c, scale, shift);
    const auto in = load<VEC>(x.plane(n, c) + offset);
    Pack<scalar_t, VEC> result;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      result.v[i] = static_cast<scalar_t>(relu(static_cast<math_t>(in.v[i]) * scale + shift));
    }
    store<VEC>(out.plane(n, c) + offset, result);
  }
};

template <typename math_t>
ChannelAffine<math_t> affine_of(const ChannelVectors& v) {
  return {
      v.mean.const_data_ptr<math_t>(), v.invstd.const_data_ptr<math_t>(),
      v.weight.const_data_ptr<math_t>(), v.bias.const_data_ptr<math_t>()};
}

// ---------------------------------------------------------------------------
// Backward of s = relu(y), y = γ·x̂ + β, x̂ = (x − μ)·r, per channel, sums over
// the M = N·H·W values of the channel. With g = ds·[y > 0] (y recomputed
// from x exactly as the forward does):
//   dβ = Σ g,   dγ = Σ g·x̂ = r·Σ g·(x − μ).
// Fixed statistics (eval): dx = γ·r·g.
// Batch statistics μ = Σx/M, r = (Σ(x − μ)²/M + ε)^(-1/2): differentiating
// through μ and r adds −(γ·r/M)·(dβ + x̂·dγ), so
//   dx = γ·r·(g − dβ/M − (x − μ)·r·dγ/M).
// Pass 1 (reduce_chunks + finalize) forms dβ, dγ and per-channel
// coefficients; pass 2 writes (or adds) dx elementwise.

template <typename math_t>
struct GradSums {
  math_t g;
  math_t g_centered;
};

template <typename math_t>
__device__ __forceinline__ math_t gated(math_t grad, math_t x, math_t scale, math_t shift) {
  // The ReLU passes the gradient unless y <= 0 (ATen's threshold_backward).
  return x * scale + shift <= 0 ? math_t(0) : grad;
}

template <typename scalar_t, typename math_t, int VEC>
struct GradSumsReducer {
  static constexpr int kVec = VEC;
  using State = GradSums<math_t>;
  Planes<const scalar_t> grad_out;
  Planes<const scalar_t> x;
  ChannelAffine<math_t> affine;

  __device__ State identity() const {
    return {0, 0};
  }
  __device__ State merge(const State& a, const State& b) const {
    return {a.g + b.g, a.g_centered + b.g_centered};
  }
  __device__ static State shuffle_down(const State& s, int offset) {
    return {
        __shfl_down_sync(0xffffffff, s.g, offset),
        __shfl_down_sync(0xffffffff, s.g_centered, offset)};
  }
  __device__ void accumulate(State& state, int64_t n, int64_t c, int64_t offset) const {
    math_t scale, shift;
    affine.scale_shift(c, scale, shift);
    const math_t mean = affine.mean[c];
    const auto dy = load<VEC>(grad_out.plane(n, c) + offset);
    const auto in = load<VEC>(x.plane(n, c) + offset);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const math_t v = static_cast<math_t>(in.v[i]);
      const math_t g = gated(static_cast<math_t>(dy.v[i]), v, scale, shift);
      state.g += g;
      state.g_centered += g * (v - mean);
    }
  }
};

// Per channel: what pass 2 needs, from the statistics and the two sums.
template <typename math_t>
struct GradCoefficients {
  math_t scale;          // γ·r
  math_t shift;          // β − μ·γ·r (the ReLU gate)
  math_t mean_g;         // dβ/M (batch statistics) or 0
  math_t centered_coef;  // r·dγ/M (batch statistics) or 0
};

template <typename math_t>
__global__ void finalize_grad_kernel(
    const GradSums<math_t>* partials,
    int64_t channels,
    int64_t chunks,
    int64_t count,
    bool batch_stats,
    ChannelAffine<math_t> affine,
    math_t* grad_weight,
    math_t* grad_bias,
    GradCoefficients<math_t>* coefficients) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) {
    return;
  }
  math_t sum_g = 0, sum_g_centered = 0;
  for (int64_t s = 0; s < chunks; ++s) {
    sum_g += partials[c * chunks + s].g;
    sum_g_centered += partials[c * chunks + s].g_centered;
  }
  const math_t r = affine.invstd[c];
  grad_weight[c] = sum_g_centered * r;
  grad_bias[c] = sum_g;
  GradCoefficients<math_t> k;
  affine.scale_shift(c, k.scale, k.shift);
  k.mean_g = batch_stats ? sum_g / static_cast<math_t>(count) : math_t(0);
  k.centered_coef = batch_stats ? sum_g_centered * r * r / static_cast<math_t>(count) : math_t(0);
  coefficients[c] = k;
}

template <typename scalar_t, typename math_t, int VEC, bool accumulate>
struct GradInput {
  static constexpr int kVec = VEC;
  Planes<const scalar_t> grad_out;
  Planes<const scalar_t> x;
  Planes<scalar_t> grad_in;
  const math_t* mean;
  const GradCoefficients<math_t>* coefficients;

  __device__ void operator()(int64_t n, int64_t c, int64_t offset) const {
    const GradCoefficients<math_t> k = coefficients[c];
    const math_t mu = mean[c];
    const auto dy = load<VEC>(grad_out.plane(n, c) + offset);
    const auto in = load<VEC>(x.plane(n, c) + offset);
    scalar_t* target = grad_in.plane(n, c) + offset;
    Pack<scalar_t, VEC> previous;
    if constexpr (accumulate) {
      previous = load<VEC>(static_cast<const scalar_t*>(target));
    }
    Pack<scalar_t, VEC> result;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const math_t v = static_cast<math_t>(in.v[i]);
      const math_t g = gated(static_cast<math_t>(dy.v[i]), v, k.scale, k.shift);
      math_t d = k.scale * (g - k.mean_g - (v - mu) * k.centered_coef);
      if constexpr (accumulate) {
        d += static_cast<math_t>(previous.v[i]);
      }
      result.v[i] = static_cast<scalar_t>(d);
    }
    store<VEC>(target, result);
  }
};

template <typename scalar_t, int VEC, bool accumulate>
void bn_relu_backward_launch(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelVectors& vectors,
    bool batch_stats,
    const at::Tensor& grad_input,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias) {
  using math_t = at::opmath_type<scalar_t>;
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t plane_size = input.size(2) * input.size(3);
  const auto dy = planes_of<const scalar_t>(grad_output);
  const auto x = planes_of<const scalar_t>(input);
  const auto affine = affine_of<math_t>(vectors);
  ChunkPlan plan{};
  auto partials = launch_reduce_chunks(
      batch, channels, plane_size, GradSumsReducer<scalar_t, math_t, VEC>{dy, x, affine}, input, plan);
  auto coefficients = at::empty(
      {channels * static_cast<int64_t>(sizeof(GradCoefficients<math_t>))}, input.options().dtype(at::kByte));
  auto* k = reinterpret_cast<GradCoefficients<math_t>*>(coefficients.data_ptr());
  finalize_grad_kernel<math_t><<<finalize_blocks(channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const GradSums<math_t>*>(partials.data_ptr()), channels, plan.chunks,
      batch * plane_size, batch_stats, affine, grad_weight.mutable_data_ptr<math_t>(),
      grad_bias.mutable_data_ptr<math_t>(), k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_for_each_vector(batch, channels, plane_size,
      GradInput<scalar_t, math_t, VEC, accumulate>{
          dy, x, planes_of<scalar_t>(grad_input), affine.mean, k},
      input.device().index());
}

struct CudaKernels {
  static void channel_stats(const at::Tensor& input, at::Tensor& mean, at::Tensor& var) {
    const int64_t plane_size = input.size(2) * input.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_stats_cuda", [&] {
      constexpr int wide = kBytesPerVector / sizeof(scalar_t);
      if (vector_width<scalar_t>(plane_size, {&input}) == wide) {
        channel_stats_launch<scalar_t, wide>(input, mean, var);
      } else {
        channel_stats_launch<scalar_t, 1>(input, mean, var);
      }
    });
  }

  static void bn_relu(const at::Tensor& input, const ChannelVectors& vectors, const at::Tensor& out) {
    const int64_t batch = input.size(0), channels = input.size(1);
    const int64_t plane_size = input.size(2) * input.size(3);
    const auto device = input.device().index();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_cuda", [&] {
      using math_t = at::opmath_type<scalar_t>;
      constexpr int wide = kBytesPerVector / sizeof(scalar_t);
      const auto x = planes_of<const scalar_t>(input);
      const auto y = planes_of<scalar_t>(out);
      if (vector_width<scalar_t>(plane_size, {&input, &out}) == wide) {
        launch_for_each_vector(batch, channels, plane_size,
            BnReluForward<scalar_t, math_t, wide>{x, y, affine_of<math_t>(vectors)}, device);
      } else {
        launch_for_each_vector(batch, channels, plane_size,
            BnReluForward<scalar_t, math_t, 1>{x, y, affine_of<math_t>(vectors)}, device);
      }
    });
  }

  template <bool accumulate>
  static void backward(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      bool batch_stats,
      const at::Tensor& grad_input,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias) {
    const int64_t plane_size = input.size(2) * input.size(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_cuda", [&] {
      constexpr int wide = kBytesPerVector / sizeof(scalar_t);
      if (vector_width<scalar_t>(plane_size, {&input, &grad_output, &grad_input}) == wide) {
        bn_relu_backward_launch<scalar_t, wide, accumulate>(
            grad_output, input, vectors, batch_stats, grad_input, grad_weight, grad_bias);
      } else {
        bn_relu_backward_launch<scalar_t, 1, accumulate>(
            grad_output, input, vectors, batch_stats, grad_input, grad_weight, grad_bias);
      }
    });
  }
};

} // namespace

TORCH_LIBRARY_IMPL(densenet_efficient, CUDA, m) {
  register_per_channel_ops<CudaKernels>(m);
}

} // namespace densenet_efficient
