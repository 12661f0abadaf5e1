// The columns ("im2col") of a "same" convolution over small maps, so that it
// runs as GEMMs (convolution.cpp says when and why): a k×k (k×k×k) kernel,
// k odd, stride 1, padding (k − 1)/2, over [N, C, *spatial] maps of P pixels.
// Row n·P + p of the [N·P, C·T] columns holds, for each of the T = k^d taps t
// and each channel c, the input at pixel p + t − centre of sample n, zero
// where that falls outside the map. Then out[n, :, p] = W · row, W the
// weight as a [C_out, C·T] matrix in the columns' order.
#pragma once

#include <ATen/core/Tensor.h>

namespace densenet_efficient::cpu {

// The order of a row's C·T values, that of the weight's memory so that it is
// a matrix without a copy: channel-major (c·T + t) for a contiguous weight
// [C_out, C, k, …], tap-major (t·C + c) for a channels-last one.
enum class TapOrder { channel_major, tap_major };

// The columns of `input` (any strides; float64/32/16, bfloat16), contiguous.
at::Tensor tap_columns(const at::Tensor& input, int64_t kernel_size, TapOrder order);

// The input gradient from the columns' gradient [N·P, C·T] (in the maps'
// dtype: for half/bfloat16 each value is rounded once before this sum): each
// input pixel q sums, in the math type, the values of the (p, t) with
// p + t − centre = q, in increasing p (one fixed order: deterministic).
// Written into `grad_input`, [N, C, *spatial] with any non-overlapping strides.
void tap_columns_backward(
    const at::Tensor& grad_columns,
    int64_t kernel_size,
    TapOrder order,
    const at::Tensor& grad_input);

} // namespace densenet_efficient::cpu
