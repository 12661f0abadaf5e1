// What the CPU kernels share, whichever way they walk a tensor (along
// planes, bn_relu_kernel.cpp; along channel rows, channel_rows_kernel.cpp):
// how values are read and written in the math type, BatchNorm's affine form,
// the ReLU gate of backward, and how work is split.
#pragma once

#include "../per_channel_ops.h"

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace densenet_efficient::cpu {

// Grain sizes in planes/channels; below them threading costs more than it
// saves.
inline int64_t grain_for(int64_t plane_size) {
  constexpr int64_t kElementsPerTask = 32768;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, plane_size));
}

// The functions holding the loops are built for three x86-64 levels:
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the build's baseline (SSE2),
// and the loader picks the best the CPU runs (GCC's function
// multiversioning, resolved once through an ifunc). Vectors four times as
// wide, same arithmetic: no multiply-adds are formed (-ffp-contract=off) and
// c10's half/bfloat16 conversions are its software ones at every level;
// only the lanes of the plane walk's in-register sums change with the
// vector width, so those sums' last bits differ between an AVX-512 and an
// AVX2 machine (docs/design.md). Clang cannot clone templates, and ifuncs
// need glibc: elsewhere the baseline alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__GLIBC__)
#define DENSENET_VECTORIZED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DENSENET_VECTORIZED
#endif

// Loops are written plainly with `omp simd` (reductions included) so
// the compiler vectorises them for the target without reassociating anything
// else. Arithmetic is in math_t (float for half/bfloat16/float); sums run in
// math_t over blocks of kSumBlock values and add up the blocks in double: a
// volume's plane (96³ and more) summed in float alone loses the variance.
constexpr int64_t kSumBlock = 4096;

// How the loops read and write values, in the math type: float and
// double as they are; half and bfloat16 through their 16 bits, with c10's own
// conversions (so rounding is c10::Half's and c10::BFloat16's). Through the
// c10 types themselves those loops did not vectorise (a struct copy per
// store), which made the half and bfloat16 kernels ten times slower than
// float's; the conversions' selects vectorise given -fno-trapping-math
// (setup.py).
template <typename scalar_t>
struct Element {
  using raw_t = scalar_t;
  using math_t = at::opmath_type<scalar_t>;
  static math_t load(raw_t v) {
    return v;
  }
  static raw_t store(math_t v) {
    return v;
  }
  // The largest value stored as zero or less.
  static constexpr math_t zero_up_to = 0;
};

template <>
struct Element<c10::BFloat16> {
  using raw_t = uint16_t;
  static float load(uint16_t bits) {
    return c10::detail::f32_from_bits(bits);
  }
  static uint16_t store(float v) {
    return c10::detail::round_to_nearest_even(v);
  }
  // Half the smallest bfloat16 (2^-133), which rounds to even: zero. Equal to
  // load(store(y)) <= 0 for every float y (checked on all 2^32).
  static constexpr float zero_up_to = 0x1p-134f;
};

template <>
struct Element<c10::Half> {
  using raw_t = uint16_t;
  static float load(uint16_t bits) {
    return c10::detail::fp16_ieee_to_fp32_value(bits);
  }
  static uint16_t store(float v) {
    return c10::detail::fp16_ieee_from_fp32_value(v);
  }
  // Half the smallest half (2^-24), which rounds to even: zero. Equal to
  // load(store(y)) <= 0 for every float y (checked on all 2^32).
  static constexpr float zero_up_to = 0x1p-25f;
};

// The raw elements of a plane (c10::Half and c10::BFloat16 hold just their bits).
template <typename scalar_t>
const typename Element<scalar_t>::raw_t* raw(const scalar_t* p) {
  static_assert(sizeof(typename Element<scalar_t>::raw_t) == sizeof(scalar_t));
  return reinterpret_cast<const typename Element<scalar_t>::raw_t*>(p);
}
template <typename scalar_t>
typename Element<scalar_t>::raw_t* raw(scalar_t* p) {
  static_assert(sizeof(typename Element<scalar_t>::raw_t) == sizeof(scalar_t));
  return reinterpret_cast<typename Element<scalar_t>::raw_t*>(p);
}

// The affine form of BatchNorm (ATen's): y = x·scale + shift with
// scale = γ·invstd, shift = β − μ·scale, invstd = 1/sqrt(var + ε). Forward and
// backward both form it here, so the ReLU gate recomputed in backward is
// bit-identical to the forward's.
template <typename math_t>
struct Affine {
  math_t invstd, scale, shift, mean;

  Affine(const ChannelParams<math_t>& v, int64_t c)
      : invstd(math_t(1) / std::sqrt(v.var[c] + v.eps)),
        scale(v.weight[c] * invstd),
        shift(v.bias[c] - v.mean[c] * scale),
        mean(v.mean[c]) {}
};

// Backward's per-channel terms (bn_relu_kernel.cpp derives them), from the
// channel's gradient sums Σg and Σg·(x − μ) in double over `count` values:
// dγ = invstd·Σg(x − μ), dβ = Σg, and the terms of
// dx = scale·(g − mean_g − (x − μ)·centered_coef): with batch statistics
// mean_g = Σg/M and centered_coef = invstd²·Σg(x − μ)/M, zero with fixed ones.
template <typename math_t>
struct ChannelBackward {
  math_t grad_weight, grad_bias, mean_g, centered_coef;

  ChannelBackward(double sum_g, double sum_g_centered, math_t invstd, bool batch_stats, double count)
      : grad_weight(static_cast<math_t>(sum_g_centered * invstd)),
        grad_bias(static_cast<math_t>(sum_g)),
        mean_g(batch_stats ? static_cast<math_t>(sum_g / count) : math_t(0)),
        centered_coef(batch_stats ? static_cast<math_t>(sum_g_centered * invstd * invstd / count) : math_t(0)) {}

  // With batch statistics whose dγ and dβ, over `count` values, come from
  // elsewhere (a global batch: synchronised BatchNorm).
  ChannelBackward(math_t grad_weight_, math_t grad_bias_, math_t invstd, double count)
      : grad_weight(grad_weight_),
        grad_bias(grad_bias_),
        mean_g(static_cast<math_t>(grad_bias_ / count)),
        centered_coef(static_cast<math_t>(grad_weight_ * invstd / count)) {}
};

// The ReLU gate of backward: the gradient passes unless the stored output is
// <= 0 (ATen's threshold_backward gates on relu's result): a tiny positive y
// that half/bfloat16 rounds to zero passes no gradient, as in PyTorch. That is
// y <= Element::zero_up_to (NaN passes), without the round trip through the
// stored type.
template <typename scalar_t, typename math_t>
inline math_t gated(math_t grad, math_t x, math_t scale, math_t shift) {
  return x * scale + shift <= Element<scalar_t>::zero_up_to ? math_t(0) : grad;
}


} // namespace densenet_efficient::cpu
