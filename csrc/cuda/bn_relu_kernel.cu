// CUDA kernels of the per-channel operators of the efficient dense block
// over tensors of contiguous planes: channel statistics (alone, or fused with
// the copy of new features), fused BatchNorm+ReLU forward and its backward;
// with the channel-row walk (channel_rows_kernel.cu) they make the CUDA
// implementation of the operators.
//
// Layout: [N, C, *spatial] tensors whose planes (a sample's and channel's
// spatial elements) are contiguous (the block buffer, channel slices of it,
// contiguous scratches). The elementwise kernels and the per-channel
// reductions are carried out by launch.cuh as the host plans of
// ../launch_plan.h (tested on the CPU) say; the arithmetic is
// bn_relu_math.cuh's.
#include "bn_relu_math.cuh"
#include "channel_rows.h"
#include "launch.cuh"
#include "running_stats_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>

namespace densenet_efficient {
namespace {

using namespace gpu;

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
      auto affine = affine_of(params, c);
      int64_t channel = c, p = position;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (p == plane_size) {  // the vector crossed into the next channel's plane
          p = 0;
          affine = affine_of(params, ++channel);
        }
        result.v[i] = static_cast<scalar_t>(relu(affine(static_cast<math_t>(in.v[i]))));
        ++p;
      }
      store<VEC>(out.at(n, c, position), result);
    }
  };
};

// Backward (the derivation is in bn_relu_math.cuh): pass 1's sums, pass 2.

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
      return {c, affine_of(params, c), params.mean[c]};
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

// Backward's passes along planes.
struct PlaneWalk {
  template <typename scalar_t>
  static std::pair<at::Tensor, int64_t> grad_sums(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelParams<at::opmath_type<scalar_t>>& params) {
    return launch_reduce_chunks<GradSumsOf<scalar_t>::template Reducer, scalar_t>(
        {&input, &grad_output}, planes_of<const scalar_t>(grad_output), planes_of<const scalar_t>(input), params);
  }

  template <typename scalar_t, bool accumulate>
  static void grad_input(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const at::Tensor& grad_input,
      const GradCoefficients<at::opmath_type<scalar_t>>* coefficients) {
    launch_for_each_vector<GradInputOf<scalar_t, accumulate>::template Op, scalar_t>(
        input, {&input, &grad_output, &grad_input}, planes_of<const scalar_t>(grad_output),
        planes_of<const scalar_t>(input), planes_of<scalar_t>(grad_input), coefficients);
  }
};

// The plane walk; the channel-row walk comes from ChannelRowKernels.
struct CudaKernels : ChannelRowKernels {
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
      Backward<PlaneWalk>::both<scalar_t, accumulate>(
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
      Backward<PlaneWalk>::grad_sums<scalar_t>(
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
      Backward<PlaneWalk>::grad_input_from_sums<scalar_t, accumulate>(
          grad_output, input, vectors, eps, sums, count, grad_input);
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
