// The backward of a "same" convolution over channels-last maps as GEMMs over
// zero-padded grids of its operands, one per tap for each gradient
// (shifted_taps.cpp derives them): a k×k (k×k×k) kernel, k odd, stride 1,
// padding (k − 1)/2. oneDNN's channels-last backward passes the weight
// gradient through two weight-sized copies and reorders the weight for the
// input gradient; over small maps these grids are smaller than all that
// (convolution.cpp says when).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace densenet_efficient::cpu {

// Elements of the two grids shifted_tap_backward allocates for
// [N, C_in, *spatial] maps, a C_out-channel output and a k-wide kernel.
int64_t shifted_tap_grid_elements(const at::Tensor& input, int64_t out_channels, int64_t kernel_size);

// (dx, dW) for `input` [N, C_in, *spatial], `grad_output` [N, C_out, *spatial]
// (any strides; float64/32/16, bfloat16) and `weight` [C_out, C_in, k, …]:
// dx channels last, dW contiguous or channels last as the weight suggests.
std::tuple<at::Tensor, at::Tensor> shifted_tap_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& weight);

} // namespace densenet_efficient::cpu
