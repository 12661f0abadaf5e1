// The arithmetic the CUDA per-channel kernels share, whichever way they walk
// memory (planes: bn_relu_kernel.cu; channel rows: channel_rows_kernel.cu):
// BatchNorm's affine step rounded as on the CPU, the ReLU gate, Welford
// statistics, backward's sums and per-channel coefficients, the kernels that
// finalize per-(channel, chunk) partial results, and backward's two passes
// over a walk. Arithmetic is in the math type: float for half/bfloat16/float,
// double for double.
#pragma once

#include "launch.cuh"

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace densenet_efficient::gpu {

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
__device__ Affine<math_t> affine_of(const ChannelParams<math_t>& p, int64_t c) {
  Affine<math_t> a;
  a.invstd = inverse_sqrt(add(p.var[c], p.eps));
  a.scale = multiply(p.weight[c], a.invstd);
  a.shift = subtract(p.bias[c], multiply(p.mean[c], a.scale));
  return a;
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
// Backward of s = relu(y), y = γ·x̂ + β, x̂ = (x − μ)·r, per channel, sums over
// the M = N·P values of the channel (P: its plane). With g = ds·[y > 0] (y recomputed
// from x exactly as the forward does):
//   dβ = Σ g,   dγ = Σ g·x̂ = r·Σ g·(x − μ).
// Fixed statistics (eval): dx = γ·r·g.
// Batch statistics μ = Σx/M, r = (Σ(x − μ)²/M + ε)^(-1/2): differentiating
// through μ and r adds −(γ·r/M)·(dβ + x̂·dγ), so
//   dx = γ·r·(g − dβ/M − (x − μ)·r·dγ/M).
// Pass 1 (a walk's per-(channel, chunk) partial sums, then finalize) forms dβ,
// dγ and per-channel coefficients; pass 2 writes (or adds) dx elementwise.

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


// Per channel: what pass 1 needs.
template <typename math_t>
struct GradChannel {
  int64_t c;
  Affine<math_t> affine;
  math_t mean;
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
  k.affine = affine_of(params, c);
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
  k.affine = affine_of(params, c);
  k.mean = params.mean[c];
  const math_t values = static_cast<math_t>(*count);
  k.mean_g = grad_bias[c] / values;
  k.centered_coef = grad_weight[c] * k.affine.invstd / values;
  coefficients[c] = k;
}

// Room for pass 2's per-channel coefficients.
template <typename math_t>
at::Tensor coefficient_storage(const at::Tensor& input) {
  return at::empty(
      {input.size(1) * static_cast<int64_t>(sizeof(GradCoefficients<math_t>))}, input.options().dtype(at::kByte));
}

// Backward's passes over the memory a Walk walks. A Walk has
//   template <typename scalar_t> static std::pair<at::Tensor, int64_t>
//       grad_sums(grad_output, input, params)
// (partial GradSums per (channel, chunk) as bytes, [C·S] in that order, and S)
// and
//   template <typename scalar_t, bool accumulate> static void
//       grad_input(grad_output, input, grad_input, coefficients)
// (pass 2, elementwise).
template <typename Walk>
struct Backward {
  // Pass 1: the partial sums, merged per channel into grad_weight and
  // grad_bias and, given `coefficients`, into pass 2's coefficients.
  template <typename scalar_t>
  static void grad_sums(
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
    const auto partials = Walk::template grad_sums<scalar_t>(grad_output, input, params);
    finalize_grad_kernel<math_t><<<finalize_blocks(channels), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const GradSums<math_t>*>(partials.first.const_data_ptr()), channels,
        partials.second, input.size(0) * plane_size(input), batch_stats, params,
        grad_weight.mutable_data_ptr<math_t>(), grad_bias.mutable_data_ptr<math_t>(), coefficients);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Both passes.
  template <typename scalar_t, bool accumulate>
  static void both(
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
    grad_sums<scalar_t>(grad_output, input, vectors, eps, batch_stats, grad_weight, grad_bias, k);
    Walk::template grad_input<scalar_t, accumulate>(grad_output, input, grad_input, k);
  }

  // Pass 2 alone, from dγ and dβ of a whole (global) batch of `count` values
  // per channel.
  template <typename scalar_t, bool accumulate>
  static void grad_input_from_sums(
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
    Walk::template grad_input<scalar_t, accumulate>(grad_output, input, grad_input, k);
  }
};

} // namespace densenet_efficient::gpu
