// CUDA kernels of the per-channel operators of the efficient dense block:
// channel statistics (alone, or fused with the copy of new features), fused
// BatchNorm+ReLU forward and its backward.
//
// Layout: [N, C, *spatial] tensors whose planes (a sample's and channel's
// spatial elements) are contiguous (the block buffer, channel slices of it,
// contiguous scratches). The elementwise kernels and
// the per-channel reductions are carried out by launch.cuh as the host plans
// of ../launch_plan.h (tested on the CPU) say. Arithmetic is in the math
// type: float for half/bfloat16/float, double for double.
#include "launch.cuh"
#include "running_stats_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>

namespace densenet_efficient {
namespace {

using namespace gpu;

// The affine step rounded exactly as the CPU kernel (built with
// -ffp-contract=off) and ATen's CPU BatchNorm round it: every product and sum
// on its own, no fused multiply-add (nvcc would contract a·b + c into one
// rounding). Then a float32 y near zero lands on the same side of the ReLU on
// either device: a gate that flips moves a gradient by a whole dy.
template <typename math_t>
__device__ __forceinline__ math_t add(math_t a, math_t b) {
  if constexpr (std::is_same_v<math_t, float>) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
}
template <typename math_t>
__device__ __forceinline__ math_t subtract(math_t a, math_t b) {
  if constexpr (std::is_same_v<math_t, float>) {
    return __fsub_rn(a, b);
  } else {
    return __dsub_rn(a, b);
  }
}
template <typename math_t>
__device__ __forceinline__ math_t multiply(math_t a, math_t b) {
  if constexpr (std::is_same_v<math_t, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
}
// 1/sqrt, correctly rounded (rsqrtf may be 2 ulp off), as the CPU computes it.
template <typename math_t>
__device__ __forceinline__ math_t inverse_sqrt(math_t v) {
  if constexpr (std::is_same_v<math_t, float>) {
    return __fdiv_rn(1.0f, __fsqrt_rn(v));
  } else {
    return __ddiv_rn(1.0, __dsqrt_rn(v));
  }
}

// BatchNorm in ATen's affine form, y = x·scale + shift, scale = γ·invstd,
// shift = β − μ·scale, invstd = 1/sqrt(var + ε), each step rounded as above,
// so forward and the gate recomputed in backward round identically, and as
// on the CPU.
template <typename math_t>
struct Affine {
  math_t invstd;
  math_t scale;
  math_t shift;

  __device__ math_t operator()(math_t x) const {
    return add(multiply(x, scale), shift);
  }
};

template <typename math_t>
struct ChannelParams {
  const math_t* mean;
  const math_t* var;
  const math_t* weight;
  const math_t* bias;
  math_t eps;

  __device__ Affine<math_t> affine(int64_t c) const {
    Affine<math_t> a;
    a.invstd = inverse_sqrt(add(var[c], eps));
    a.scale = multiply(weight[c], a.invstd);
    a.shift = subtract(bias[c], multiply(mean[c], a.scale));
    return a;
  }
};

template <typename math_t>
ChannelParams<math_t> params_of(const ChannelVectors& v, double eps) {
  return {
      v.mean.const_data_ptr<math_t>(), v.var.const_data_ptr<math_t>(),
      v.weight.const_data_ptr<math_t>(), v.bias.const_data_ptr<math_t>(),
      static_cast<math_t>(eps)};
}

template <typename math_t>
__device__ __forceinline__ math_t relu(math_t y) {
  return y < 0 ? math_t(0) : y;  // NaN stays NaN, as torch.relu
}

// The ReLU gate of backward: the gradient passes unless the stored output is
// <= 0 (ATen's threshold_backward gates on relu's result), so y is rounded to
// the stored type first: a tiny positive y that half/bfloat16 rounds to zero
// passes no gradient, as in PyTorch.
template <typename scalar_t, typename math_t>
__device__ __forceinline__ math_t gated(math_t grad, math_t y) {
  return static_cast<math_t>(static_cast<scalar_t>(y)) <= 0 ? math_t(0) : grad;
}

// ---------------------------------------------------------------------------
// Statistics: one-pass Welford per thread (each vector's own mean and M2
// merged in with Chan's formula: one division per vector), Chan merges across
// threads and chunks.

template <typename math_t>
struct Welford {
  int64_t count;
  math_t mean;
  math_t m2;
};

template <typename math_t>
__device__ Welford<math_t> chan_merge(const Welford<math_t>& a, const Welford<math_t>& b) {
  // An empty side contributes nothing; returning the other exactly also keeps
  // inf·0 (an infinite mean, an overflowing delta²) from turning into NaN.
  if (b.count == 0) {
    return a;
  }
  if (a.count == 0) {
    return b;
  }
  const int64_t count = a.count + b.count;
  const math_t delta = b.mean - a.mean;
  // Counts in math_t (float for half/bfloat16/float) as in ATen's Welford:
  // the share is rounded beyond 2^24 values per channel.
  const math_t b_share = static_cast<math_t>(b.count) / static_cast<math_t>(count);
  return {
      count, a.mean + delta * b_share,
      a.m2 + b.m2 + delta * delta * static_cast<math_t>(a.count) * b_share};
}

template <typename math_t>
struct WelfordReduction {
  using State = Welford<math_t>;

  __device__ static State identity() {
    return {0, 0, 0};
  }
  __device__ static State merge(const State& a, const State& b) {
    return chan_merge(a, b);
  }
  __device__ static State shuffle_down(const State& s, int offset) {
    return {
        __shfl_down_sync(0xffffffff, s.count, offset),
        __shfl_down_sync(0xffffffff, s.mean, offset),
        __shfl_down_sync(0xffffffff, s.m2, offset)};
  }
  template <int VEC, typename scalar_t>
  __device__ static void add(State& state, const Pack<scalar_t, VEC>& pack) {
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

template <typename scalar_t>
struct StatsOf {
  template <int VEC>
  struct Reducer {
    static constexpr int kVec = VEC;
    using Reduction = WelfordReduction<at::opmath_type<scalar_t>>;
    Planes<const scalar_t> x;

    __device__ int64_t channel(int64_t c) const {
      return c;
    }
    __device__ void accumulate(typename Reduction::State& state, int64_t c, int64_t n, int64_t position) const {
      Reduction::template add<VEC>(state, load<VEC>(x.at(n, c, position)));
    }
  };
};

// Statistics of what it copies: each vector is read once, stored, and added in.
template <typename scalar_t>
struct CopyStatsOf {
  template <int VEC>
  struct Reducer {
    static constexpr int kVec = VEC;
    using Reduction = WelfordReduction<at::opmath_type<scalar_t>>;
    Planes<const scalar_t> source;
    Planes<scalar_t> destination;

    __device__ int64_t channel(int64_t c) const {
      return c;
    }
    __device__ void accumulate(typename Reduction::State& state, int64_t c, int64_t n, int64_t position) const {
      const auto pack = load<VEC>(source.at(n, c, position));
      store<VEC>(destination.at(n, c, position), pack);
      Reduction::template add<VEC>(state, pack);
    }
  };
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

template <typename math_t>
void launch_finalize_stats(
    const std::pair<at::Tensor, int64_t>& partials,
    const at::Tensor& mean,
    const at::Tensor& var) {
  const int64_t channels = mean.numel();
  finalize_stats_kernel<math_t><<<finalize_blocks(channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const Welford<math_t>*>(partials.first.const_data_ptr()), channels,
      partials.second, mean.mutable_data_ptr<math_t>(), var.mutable_data_ptr<math_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------
// bn_relu: out = max(0, x·scale + shift).

template <typename scalar_t>
struct BnReluOf {
  template <int VEC>
  struct Op {
    static constexpr int kVec = VEC;
    using math_t = at::opmath_type<scalar_t>;
    Planes<const scalar_t> x;
    Planes<scalar_t> out;
    ChannelParams<math_t> params;
    int64_t plane_size;

    __device__ void operator()(int64_t n, int64_t c, int64_t position) const {
      const auto in = load<VEC>(x.at(n, c, position));
      Pack<scalar_t, VEC> result;
      auto affine = params.affine(c);
      int64_t channel = c, p = position;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (p == plane_size) {  // the vector crossed into the next channel's plane
          p = 0;
          affine = params.affine(++channel);
        }
        result.v[i] = static_cast<scalar_t>(relu(affine(static_cast<math_t>(in.v[i]))));
        ++p;
      }
      store<VEC>(out.at(n, c, position), result);
    }
  };
};

// ---------------------------------------------------------------------------
// Backward of s = relu(y), y = γ·x̂ + β, x̂ = (x − μ)·r, per channel, sums over
// the M = N·P values of the channel (P: its plane). With g = ds·[y > 0] (y recomputed
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
struct GradSumsReduction {
  using State = GradSums<math_t>;

  __device__ static State identity() {
    return {0, 0};
  }
  __device__ static State merge(const State& a, const State& b) {
    return {a.g + b.g, a.g_centered + b.g_centered};
  }
  __device__ static State shuffle_down(const State& s, int offset) {
    return {
        __shfl_down_sync(0xffffffff, s.g, offset),
        __shfl_down_sync(0xffffffff, s.g_centered, offset)};
  }
};

template <typename math_t>
struct GradChannel {
  int64_t c;
  Affine<math_t> affine;
  math_t mean;
};

template <typename scalar_t>
struct GradSumsOf {
  template <int VEC>
  struct Reducer {
    static constexpr int kVec = VEC;
    using math_t = at::opmath_type<scalar_t>;
    using Reduction = GradSumsReduction<math_t>;
    using State = GradSums<math_t>;
    Planes<const scalar_t> grad_out;
    Planes<const scalar_t> x;
    ChannelParams<math_t> params;

    __device__ GradChannel<math_t> channel(int64_t c) const {
      return {c, params.affine(c), params.mean[c]};
    }
    __device__ void accumulate(State& state, const GradChannel<math_t>& ch, int64_t n, int64_t position) const {
      const auto dy = load<VEC>(grad_out.at(n, ch.c, position));
      const auto in = load<VEC>(x.at(n, ch.c, position));
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const math_t v = static_cast<math_t>(in.v[i]);
        const math_t g = gated<scalar_t>(static_cast<math_t>(dy.v[i]), ch.affine(v));
        state.g += g;
        state.g_centered += g * (v - ch.mean);
      }
    }
  };
};

// Per channel: what pass 2 needs, from the statistics and the two sums.
template <typename math_t>
struct GradCoefficients {
  Affine<math_t> affine;  // the ReLU gate; affine.scale = γ·r
  math_t mean;
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
    ChannelParams<math_t> params,
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
  GradCoefficients<math_t> k;
  k.affine = params.affine(c);
  k.mean = params.mean[c];
  const math_t r = k.affine.invstd;
  grad_weight[c] = sum_g_centered * r;
  grad_bias[c] = sum_g;
  if (coefficients == nullptr) {  // the sums alone (bn_relu_backward_sums)
    return;
  }
  k.mean_g = batch_stats ? sum_g / static_cast<math_t>(count) : math_t(0);
  k.centered_coef = batch_stats ? sum_g_centered * r * r / static_cast<math_t>(count) : math_t(0);
  coefficients[c] = k;
}

// Pass 2's coefficients from dγ and dβ of a whole (global) batch of `*count`
// values per channel, the count read on the device: no host synchronisation.
template <typename math_t>
__global__ void coefficients_from_sums_kernel(
    int64_t channels,
    ChannelParams<math_t> params,
    const math_t* grad_weight,
    const math_t* grad_bias,
    const int64_t* count,
    GradCoefficients<math_t>* coefficients) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) {
    return;
  }
  GradCoefficients<math_t> k;
  k.affine = params.affine(c);
  k.mean = params.mean[c];
  const math_t values = static_cast<math_t>(*count);
  k.mean_g = grad_bias[c] / values;
  k.centered_coef = grad_weight[c] * k.affine.invstd / values;
  coefficients[c] = k;
}

template <typename scalar_t, bool accumulate>
struct GradInputOf {
  template <int VEC>
  struct Op {
    static constexpr int kVec = VEC;
    using math_t = at::opmath_type<scalar_t>;
    Planes<const scalar_t> grad_out;
    Planes<const scalar_t> x;
    Planes<scalar_t> grad_in;
    const GradCoefficients<math_t>* coefficients;
    int64_t plane_size;

    __device__ void operator()(int64_t n, int64_t c, int64_t position) const {
      const auto dy = load<VEC>(grad_out.at(n, c, position));
      const auto in = load<VEC>(x.at(n, c, position));
      scalar_t* target = grad_in.at(n, c, position);
      Pack<scalar_t, VEC> previous;
      if constexpr (accumulate) {
        previous = load<VEC>(static_cast<const scalar_t*>(target));
      }
      Pack<scalar_t, VEC> result;
      auto k = coefficients[c];
      int64_t channel = c, p = position;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (p == plane_size) {  // the vector crossed into the next channel's plane
          p = 0;
          k = coefficients[++channel];
        }
        const math_t v = static_cast<math_t>(in.v[i]);
        const math_t g = gated<scalar_t>(static_cast<math_t>(dy.v[i]), k.affine(v));
        math_t d = k.affine.scale * (g - k.mean_g - (v - k.mean) * k.centered_coef);
        if constexpr (accumulate) {
          d += static_cast<math_t>(previous.v[i]);
        }
        result.v[i] = static_cast<scalar_t>(d);
        ++p;
      }
      store<VEC>(target, result);
    }
  };
};

// Pass 1: the partial sums, merged per channel into grad_weight and
// grad_bias and, given `coefficients`, into pass 2's coefficients.
template <typename scalar_t>
void launch_grad_sums(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelVectors& vectors,
    double eps,
    bool batch_stats,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias,
    GradCoefficients<at::opmath_type<scalar_t>>* coefficients) {
  using math_t = at::opmath_type<scalar_t>;
  const int64_t channels = input.size(1);
  const auto params = params_of<math_t>(vectors, eps);
  const auto partials = launch_reduce_chunks<GradSumsOf<scalar_t>::template Reducer, scalar_t>(
      {&input, &grad_output}, planes_of<const scalar_t>(grad_output), planes_of<const scalar_t>(input), params);
  finalize_grad_kernel<math_t><<<finalize_blocks(channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const GradSums<math_t>*>(partials.first.const_data_ptr()), channels,
      partials.second, input.size(0) * plane_size(input), batch_stats, params,
      grad_weight.mutable_data_ptr<math_t>(), grad_bias.mutable_data_ptr<math_t>(), coefficients);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Room for pass 2's per-channel coefficients.
template <typename math_t>
at::Tensor coefficient_storage(const at::Tensor& input) {
  return at::empty(
      {input.size(1) * static_cast<int64_t>(sizeof(GradCoefficients<math_t>))}, input.options().dtype(at::kByte));
}

// Pass 2: dx, written or added, elementwise.
template <typename scalar_t, bool accumulate>
void launch_grad_input(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& grad_input,
    const GradCoefficients<at::opmath_type<scalar_t>>* coefficients) {
  launch_for_each_vector<GradInputOf<scalar_t, accumulate>::template Op, scalar_t>(
      input, {&input, &grad_output, &grad_input}, planes_of<const scalar_t>(grad_output),
      planes_of<const scalar_t>(input), planes_of<scalar_t>(grad_input), coefficients);
}

template <typename scalar_t, bool accumulate>
void bn_relu_backward_launch(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelVectors& vectors,
    double eps,
    bool batch_stats,
    const at::Tensor& grad_input,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias) {
  using math_t = at::opmath_type<scalar_t>;
  auto coefficients = coefficient_storage<math_t>(input);
  auto* k = reinterpret_cast<GradCoefficients<math_t>*>(coefficients.data_ptr());
  launch_grad_sums<scalar_t>(grad_output, input, vectors, eps, batch_stats, grad_weight, grad_bias, k);
  launch_grad_input<scalar_t, accumulate>(grad_output, input, grad_input, k);
}

template <typename scalar_t, bool accumulate>
void grad_input_from_sums_launch(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const ChannelVectors& vectors,
    double eps,
    const AffineGradients& sums,
    const at::Tensor& count,
    const at::Tensor& grad_input) {
  using math_t = at::opmath_type<scalar_t>;
  const int64_t channels = input.size(1);
  auto coefficients = coefficient_storage<math_t>(input);
  auto* k = reinterpret_cast<GradCoefficients<math_t>*>(coefficients.data_ptr());
  coefficients_from_sums_kernel<math_t>
      <<<finalize_blocks(channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          channels, params_of<math_t>(vectors, eps), sums.weight.const_data_ptr<math_t>(),
          sums.bias.const_data_ptr<math_t>(), count.const_data_ptr<int64_t>(), k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_grad_input<scalar_t, accumulate>(grad_output, input, grad_input, k);
}

struct CudaKernels {
  static constexpr bool kChannelRows = false;  // channels_last tensors are copied into planes

  static void channel_stats(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_stats_cuda", [&] {
      const auto partials = launch_reduce_chunks<StatsOf<scalar_t>::template Reducer, scalar_t>(
          {&input}, planes_of<const scalar_t>(input));
      launch_finalize_stats<at::opmath_type<scalar_t>>(partials, mean, var);
    });
  }

  static void copy_with_stats(
      const at::Tensor& source,
      const at::Tensor& destination,
      const at::Tensor& mean,
      const at::Tensor& var) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source.scalar_type(), "copy_with_stats_cuda", [&] {
      const auto partials = launch_reduce_chunks<CopyStatsOf<scalar_t>::template Reducer, scalar_t>(
          {&source, &destination}, planes_of<const scalar_t>(source), planes_of<scalar_t>(destination));
      launch_finalize_stats<at::opmath_type<scalar_t>>(partials, mean, var);
    });
  }

  static void bn_relu(const at::Tensor& input, const ChannelVectors& vectors, double eps, const at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_cuda", [&] {
      using math_t = at::opmath_type<scalar_t>;
      launch_for_each_vector<BnReluOf<scalar_t>::template Op, scalar_t>(
          input, {&input, &out}, planes_of<const scalar_t>(input), planes_of<scalar_t>(out),
          params_of<math_t>(vectors, eps));
    });
  }

  template <bool accumulate>
  static void backward(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      bool batch_stats,
      const at::Tensor& grad_input,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_cuda", [&] {
      bn_relu_backward_launch<scalar_t, accumulate>(
          grad_output, input, vectors, eps, batch_stats, grad_input, grad_weight, grad_bias);
    });
  }

  static void grad_sums(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_sums_cuda", [&] {
      launch_grad_sums<scalar_t>(
          grad_output, input, vectors, eps, /*batch_stats=*/false, grad_weight, grad_bias, nullptr);
    });
  }

  template <bool accumulate>
  static void grad_input(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      const AffineGradients& sums,
      const at::Tensor& count,
      const at::Tensor& grad_input) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_input_cuda", [&] {
      grad_input_from_sums_launch<scalar_t, accumulate>(grad_output, input, vectors, eps, sums, count, grad_input);
    });
  }

  static void update_running_stats(const RunningStatsUpdate& update) {
    update_running_stats_cuda(update);
  }
};

} // namespace

TORCH_LIBRARY_IMPL(densenet_efficient, CUDA, m) {
  register_per_channel_ops<CudaKernels>(m);
}

} // namespace densenet_efficient
