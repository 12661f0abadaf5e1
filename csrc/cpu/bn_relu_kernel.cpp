// CPU kernels of the per-channel operators of the efficient dense block:
// channel statistics (alone, or fused with the copy of new features), fused
// BatchNorm+ReLU forward and its backward, and the running-statistics update.
//
// Layout: a [N, C, *spatial] tensor whose planes (one sample's and channel's
// spatial elements) are contiguous (the block buffer, channel slices of it,
// contiguous scratches). Each plane is one vectorised run; reductions
// accumulate in the math type (float for float/half/bfloat16) over blocks of a
// plane, and across blocks and planes in double. Threads split the channels
// (reductions) or the planes (elementwise).
#include "channel_rows.h"
#include "kernel_common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

namespace densenet_efficient {
namespace {

using namespace cpu;

template <typename T>
struct Planes {
  T* data;
  int64_t stride_n;
  int64_t stride_c;

  T* plane(int64_t n, int64_t c) const {
    return data + n * stride_n + c * stride_c;
  }
};

template <typename scalar_t>
Planes<const scalar_t> read_planes(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_contiguous_planes(t));
  return {t.const_data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

template <typename scalar_t>
Planes<scalar_t> write_planes(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_contiguous_planes(t));
  return {t.mutable_data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}


template <typename scalar_t, typename math_t>
DENSENET_VECTORIZED double plane_sum(const scalar_t* x_, int64_t n) {
  using E = Element<scalar_t>;
  const auto* x = raw(x_);
  double total = 0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = std::min(n, start + kSumBlock);
    math_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = start; i < end; ++i) {
      sum += E::load(x[i]);
    }
    total += sum;
  }
  return total;
}

// Copies a plane and returns the sum of what it copied.
template <typename scalar_t, typename math_t>
DENSENET_VECTORIZED double plane_copy_sum(const scalar_t* x_, scalar_t* out_, int64_t n) {
  using E = Element<scalar_t>;
  const auto* x = raw(x_);
  auto* out = raw(out_);
  double total = 0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = std::min(n, start + kSumBlock);
    math_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = start; i < end; ++i) {
      out[i] = x[i];
      sum += E::load(x[i]);
    }
    total += sum;
  }
  return total;
}

template <typename scalar_t, typename math_t>
DENSENET_VECTORIZED double plane_squared_deviations(const scalar_t* x_, int64_t n, math_t mean) {
  using E = Element<scalar_t>;
  const auto* x = raw(x_);
  double total = 0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = std::min(n, start + kSumBlock);
    math_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = start; i < end; ++i) {
      const math_t d = E::load(x[i]) - mean;
      sum += d * d;
    }
    total += sum;
  }
  return total;
}

// relu(x * scale + shift); NaN stays NaN, as torch.relu.
template <typename scalar_t, typename math_t>
DENSENET_VECTORIZED void plane_bn_relu(
    const scalar_t* x_,
    scalar_t* out_,
    int64_t n,
    math_t scale,
    math_t shift) {
  using E = Element<scalar_t>;
  const auto* x = raw(x_);
  auto* out = raw(out_);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const math_t y = E::load(x[i]) * scale + shift;
    out[i] = E::store(y < 0 ? math_t(0) : y);
  }
}

// Σg and Σg·(x − μ) over a plane; with `writes`, fixed statistics' input
// gradient dx = scale·g too, written or (`accumulate`) added, in the same pass.
template <bool writes, bool accumulate, typename scalar_t, typename math_t>
DENSENET_VECTORIZED void plane_grad_sums(
    const scalar_t* grad_out_,
    const scalar_t* x_,
    scalar_t* grad_in_,
    int64_t n,
    math_t scale,
    math_t shift,
    math_t mean,
    double& sum_g,
    double& sum_g_centered) {
  // Plain loops and locals (no lambda, no writes through the references
  // inside): what the compiler cannot prove unaliased stops it vectorising,
  // which once cost this loop 9x.
  using E = Element<scalar_t>;
  const auto* grad_out = raw(grad_out_);
  const auto* x = raw(x_);
  auto* grad_in = raw(grad_in_);
  double g_sum = 0, gc_sum = 0;
  for (int64_t start = 0; start < n; start += kSumBlock) {
    const int64_t end = std::min(n, start + kSumBlock);
    math_t g_total = 0, gc_total = 0;
#pragma omp simd reduction(+ : g_total, gc_total)
    for (int64_t i = start; i < end; ++i) {
      const math_t v = E::load(x[i]);
      const math_t g = gated<scalar_t>(E::load(grad_out[i]), v, scale, shift);
      g_total += g;
      gc_total += g * (v - mean);
      if constexpr (writes) {
        math_t d = scale * g;
        if constexpr (accumulate) {
          d += E::load(grad_in[i]);
        }
        grad_in[i] = E::store(d);
      }
    }
    g_sum += g_total;
    gc_sum += gc_total;
  }
  sum_g = g_sum;
  sum_g_centered = gc_sum;
}

// grad_in (+)= scale * (g - mean_g - (x - mean) * centered_coef)
template <bool accumulate, typename scalar_t, typename math_t>
DENSENET_VECTORIZED void plane_grad_input(
    const scalar_t* grad_out_,
    const scalar_t* x_,
    scalar_t* grad_in_,
    int64_t n,
    math_t scale,
    math_t shift,
    math_t mean,
    math_t mean_g,
    math_t centered_coef) {
  using E = Element<scalar_t>;
  const auto* grad_out = raw(grad_out_);
  const auto* x = raw(x_);
  auto* grad_in = raw(grad_in_);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const math_t v = E::load(x[i]);
    const math_t g = gated<scalar_t>(E::load(grad_out[i]), v, scale, shift);
    math_t d = scale * (g - mean_g - (v - mean) * centered_coef);
    if constexpr (accumulate) {
      d += E::load(grad_in[i]);
    }
    grad_in[i] = E::store(d);
  }
}

// Pass 1 of backward for channel c: Σg and Σg·(x − μ) over its planes;
// with `writes`, fixed statistics' whole backward (plane_grad_sums) into dx.
template <bool writes, bool accumulate, typename scalar_t, typename math_t>
std::pair<double, double> channel_grad_sums(
    const Planes<const scalar_t>& grad_out,
    const Planes<const scalar_t>& x,
    const Planes<scalar_t>& grad_in,
    int64_t batch,
    int64_t plane_size,
    int64_t c,
    const Affine<math_t>& a) {
  double sum_g = 0, sum_g_centered = 0;
  for (int64_t n = 0; n < batch; ++n) {
    double plane_g, plane_g_centered;
    plane_grad_sums<writes, accumulate, scalar_t, math_t>(
        grad_out.plane(n, c), x.plane(n, c), writes ? grad_in.plane(n, c) : nullptr, plane_size, a.scale, a.shift,
        a.mean, plane_g, plane_g_centered);
    sum_g += plane_g;
    sum_g_centered += plane_g_centered;
  }
  return {sum_g, sum_g_centered};
}

// Pass 2 for channel c: its planes of dx, written or added.
template <bool accumulate, typename scalar_t, typename math_t>
void channel_grad_input(
    const Planes<const scalar_t>& grad_out,
    const Planes<const scalar_t>& x,
    const Planes<scalar_t>& grad_in,
    int64_t batch,
    int64_t plane_size,
    int64_t c,
    const Affine<math_t>& a,
    math_t mean_g,
    math_t centered_coef) {
  for (int64_t n = 0; n < batch; ++n) {
    plane_grad_input<accumulate, scalar_t, math_t>(
        grad_out.plane(n, c), x.plane(n, c), grad_in.plane(n, c), plane_size, a.scale, a.shift, a.mean,
        mean_g, centered_coef);
  }
}

// Mean and biased variance per channel of `x`, two passes (the second over
// deviations from the mean, so no cancellation between large sums). With a
// `copy_to`, the first pass also copies x there.
template <typename scalar_t>
void channel_stats_impl(
    const at::Tensor& input,
    const at::Tensor* copy_to,
    const at::Tensor& mean,
    const at::Tensor& var) {
  using math_t = at::opmath_type<scalar_t>;
  const int64_t batch = input.size(0), channels = input.size(1);
  const int64_t plane_size = densenet_efficient::plane_size(input);
  const int64_t count = batch * plane_size;
  const auto x = read_planes<scalar_t>(input);
  const auto out = copy_to != nullptr ? write_planes<scalar_t>(*copy_to) : Planes<scalar_t>{};
  auto* mean_out = mean.mutable_data_ptr<math_t>();
  auto* var_out = var.mutable_data_ptr<math_t>();
  at::parallel_for(0, channels, grain_for(count), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double sum = 0;
      for (int64_t n = 0; n < batch; ++n) {
        sum += copy_to != nullptr
            ? plane_copy_sum<scalar_t, math_t>(x.plane(n, c), out.plane(n, c), plane_size)
            : plane_sum<scalar_t, math_t>(x.plane(n, c), plane_size);
      }
      const math_t m = static_cast<math_t>(sum / count);
      double squared_deviations = 0;
      for (int64_t n = 0; n < batch; ++n) {
        squared_deviations +=
            plane_squared_deviations<scalar_t, math_t>(x.plane(n, c), plane_size, m);
      }
      mean_out[c] = m;
      var_out[c] = static_cast<math_t>(squared_deviations / count);
    }
  });
}

template <typename running_t, typename stat_t>
void update_running_stats_impl(const RunningStatsUpdate& update) {
  const int64_t count = update.count.const_data_ptr<int64_t>()[0];
  const auto* batch_mean = update.batch_mean.const_data_ptr<stat_t>();
  const auto* batch_var = update.batch_var.const_data_ptr<stat_t>();
  const double unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 0;
  for (const auto& norm : update.norms) {
    auto* tracked = norm.num_batches_tracked.mutable_data_ptr<int64_t>();
    *tracked += 1;
    if (count < 2) {
      continue;
    }
    const double factor = norm.momentum.has_value() ? *norm.momentum : 1.0 / static_cast<double>(*tracked);
    auto* mean = norm.mean.mutable_data_ptr<running_t>();
    auto* var = norm.var.mutable_data_ptr<running_t>();
    for (const auto c : c10::irange(norm.mean.numel())) {
      const auto i = norm.offset + c;
      mean[c] = static_cast<running_t>(
          (1 - factor) * static_cast<double>(mean[c]) + factor * static_cast<double>(batch_mean[i]));
      var[c] = static_cast<running_t>(
          (1 - factor) * static_cast<double>(var[c]) +
          factor * unbias * static_cast<double>(batch_var[i]));
    }
  }
}

struct CpuKernels : cpu::ChannelRowKernels {
  static void channel_stats(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "channel_stats_cpu",
        [&] { channel_stats_impl<scalar_t>(input, nullptr, mean, var); });
  }

  static void copy_with_stats(
      const at::Tensor& source,
      const at::Tensor& destination,
      const at::Tensor& mean,
      const at::Tensor& var) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, source.scalar_type(), "copy_with_stats_cpu",
        [&] { channel_stats_impl<scalar_t>(source, &destination, mean, var); });
  }

  static void bn_relu(
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      const at::Tensor& out) {
    const int64_t batch = input.size(0), channels = input.size(1);
    const int64_t plane_size = densenet_efficient::plane_size(input);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_cpu", [&] {
          using math_t = at::opmath_type<scalar_t>;
          const auto params = params_of<math_t>(vectors, eps);
          const auto x = read_planes<scalar_t>(input);
          const auto y = write_planes<scalar_t>(out);
          at::parallel_for(
              0, batch * channels, grain_for(plane_size),
              [&](int64_t begin, int64_t end) {
                for (int64_t i = begin; i < end; ++i) {
                  const int64_t n = i / channels, c = i % channels;
                  const Affine<math_t> a(params, c);
                  plane_bn_relu<scalar_t, math_t>(
                      x.plane(n, c), y.plane(n, c), plane_size, a.scale, a.shift);
                }
              });
        });
  }

  // Backward of s = relu(y), y = γ·x̂ + β, x̂ = (x − μ)·r, per channel, sums
  // over the M = N·P elements of the channel (P: its plane). With g = ds·[y > 0]:
  //   dβ = Σ g,   dγ = Σ g·x̂ = r·Σ g·(x − μ).
  // Fixed statistics (eval): dx = γ·r·g.
  // Batch statistics μ = Σx/M, r = (Σ(x − μ)²/M + ε)^(-1/2): differentiating
  // through μ and r adds −(γ·r/M)·(dβ + x̂·dγ), so
  //   dx = γ·r·(g − dβ/M − (x − μ)·r·dγ/M)
  // which is the formula of ATen's batch_norm_backward with g for ds.
  // `accumulate` adds dx into grad_input instead of overwriting it.
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
    const int64_t batch = input.size(0), channels = input.size(1);
    const int64_t plane_size = densenet_efficient::plane_size(input);
    const int64_t count = batch * plane_size;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_cpu",
        [&] {
          using math_t = at::opmath_type<scalar_t>;
          const auto params = params_of<math_t>(vectors, eps);
          const auto x = read_planes<scalar_t>(input);
          const auto dy = read_planes<scalar_t>(grad_output);
          const auto dx = write_planes<scalar_t>(grad_input);
          auto* dw = grad_weight.mutable_data_ptr<math_t>();
          auto* db = grad_bias.mutable_data_ptr<math_t>();
          at::parallel_for(
              0, channels, grain_for(count), [&](int64_t begin, int64_t end) {
                for (int64_t c = begin; c < end; ++c) {
                  const Affine<math_t> a(params, c);
                  if (!batch_stats) {  // dx = scale·g needs no sums first: one pass
                    const auto [sum_g, sum_g_centered] =
                        channel_grad_sums<true, accumulate, scalar_t, math_t>(dy, x, dx, batch, plane_size, c, a);
                    const ChannelBackward<math_t> terms(sum_g, sum_g_centered, a.invstd, false, 0);
                    dw[c] = terms.grad_weight;
                    db[c] = terms.grad_bias;
                    continue;
                  }
                  const auto [sum_g, sum_g_centered] = channel_grad_sums<false, false, scalar_t, math_t>(
                      dy, x, Planes<scalar_t>{}, batch, plane_size, c, a);
                  const ChannelBackward<math_t> terms(
                      sum_g, sum_g_centered, a.invstd, batch_stats, static_cast<double>(count));
                  dw[c] = terms.grad_weight;
                  db[c] = terms.grad_bias;
                  channel_grad_input<accumulate, scalar_t, math_t>(
                      dy, x, dx, batch, plane_size, c, a, terms.mean_g, terms.centered_coef);
                }
              });
        });
  }

  // Pass 1 alone: dγ and dβ.
  static void grad_sums(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias) {
    const int64_t batch = input.size(0), channels = input.size(1);
    const int64_t plane_size = densenet_efficient::plane_size(input);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_sums_cpu", [&] {
          using math_t = at::opmath_type<scalar_t>;
          const auto params = params_of<math_t>(vectors, eps);
          const auto x = read_planes<scalar_t>(input);
          const auto dy = read_planes<scalar_t>(grad_output);
          auto* dw = grad_weight.mutable_data_ptr<math_t>();
          auto* db = grad_bias.mutable_data_ptr<math_t>();
          at::parallel_for(0, channels, grain_for(batch * plane_size), [&](int64_t begin, int64_t end) {
            for (int64_t c = begin; c < end; ++c) {
              const Affine<math_t> a(params, c);
              const auto [sum_g, sum_g_centered] =
                  channel_grad_sums<false, false, scalar_t, math_t>(dy, x, Planes<scalar_t>{}, batch, plane_size, c, a);
              const ChannelBackward<math_t> terms(sum_g, sum_g_centered, a.invstd, /*batch_stats=*/false, 0);
              dw[c] = terms.grad_weight;
              db[c] = terms.grad_bias;
            }
          });
        });
  }

  // Pass 2 alone, with batch statistics whose dγ and dβ (`sums`) and count
  // come from elsewhere: those of a global batch, for synchronised BatchNorm.
  template <bool accumulate>
  static void grad_input(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      const AffineGradients& sums,
      const at::Tensor& count,
      const at::Tensor& grad_input) {
    const int64_t batch = input.size(0), channels = input.size(1);
    const int64_t plane_size = densenet_efficient::plane_size(input);
    const double values = static_cast<double>(count.const_data_ptr<int64_t>()[0]);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "bn_relu_backward_input_cpu", [&] {
          using math_t = at::opmath_type<scalar_t>;
          const auto params = params_of<math_t>(vectors, eps);
          const auto x = read_planes<scalar_t>(input);
          const auto dy = read_planes<scalar_t>(grad_output);
          const auto dx = write_planes<scalar_t>(grad_input);
          const auto* dw = sums.weight.const_data_ptr<math_t>();
          const auto* db = sums.bias.const_data_ptr<math_t>();
          at::parallel_for(0, channels, grain_for(batch * plane_size), [&](int64_t begin, int64_t end) {
            for (int64_t c = begin; c < end; ++c) {
              const Affine<math_t> a(params, c);
              const ChannelBackward<math_t> terms(dw[c], db[c], a.invstd, values);
              channel_grad_input<accumulate, scalar_t, math_t>(
                  dy, x, dx, batch, plane_size, c, a, terms.mean_g, terms.centered_coef);
            }
          });
        });
  }

  static void update_running_stats(const RunningStatsUpdate& update) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, update.batch_mean.scalar_type(), "update_running_stats_cpu", [&] {
      using stat_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, update.norms.front().mean.scalar_type(),
          "update_running_stats_cpu", [&] { update_running_stats_impl<scalar_t, stat_t>(update); });
    });
  }
};

} // namespace

TORCH_LIBRARY_IMPL(densenet_efficient, CPU, m) {
  register_per_channel_ops<CpuKernels>(m);
}

} // namespace densenet_efficient
