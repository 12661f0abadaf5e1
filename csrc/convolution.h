// The convolutions of a dense layer (and of the fused transition): bias-free,
// stride 1, of the input's spatial rank. On the CPU the 1×1 ones and those
// over maps of at most 16 pixels are GEMMs, and so is the backward over
// channels-last maps that their weights outweigh (convolution.cpp says where
// and why); the rest are ATen's (oneDNN, cuDNN).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace densenet_efficient::block {

using at::Tensor;

// Bias-free, stride-1 convolutions of the input's spatial rank (1-D, 2-D or
// 3-D): 1×1 (no padding), its output in the input's memory format, and 3×3
// (padding 1), its output as ATen gives it or, over small CPU maps, in the
// input's. On the CPU both run over one-pixel maps as one GEMM of their
// channel rows [N, C] (the 3×3's centre tap alone meets the pixel), whose
// order is the same in either layout; and the 3×3 one over maps of up to 16
// pixels as GEMMs over its tap columns (convolution.cpp).
Tensor conv1x1(const Tensor& input, const Tensor& weight);
Tensor conv3x3(const Tensor& input, const Tensor& weight);

// The memory format of ATen's convolution output for these operands as a
// naive layer passes them: its backend's choice (on the CPU channels last
// when either operand is, but contiguous from float64's 3-D slow path).
// A naive layer's dropout draws on that layout in memory order, and ours
// must draw alike.
at::MemoryFormat aten_output_format(const Tensor& input, const Tensor& weight, int64_t padding);

// The 1×1 convolution is one GEMM per sample over the plane, out[n] = W·in[n]
// with W viewed as [C_out, C_in]. On the CPU conv1x1 and its backward run as
// such (at::bmm, the weight shared across the batch by a zero stride; for
// channels-last maps, whose channel rows form one [N·plane, C] matrix, one
// at::mm over every pixel; for planes of under 16 values, one at::mm over
// channel-major copies, see narrow_planes): then
// the input gradient can go where the caller says, and no operand is copied
// into oneDNN's layouts (for densenet121's first block at batch 16 that
// copying tripled the backward's time and added 34 MiB of transients). On
// CUDA they are cuDNN convolutions (convolution.cpp says why).
//
// Gradients of conv1x1 w.r.t. its input and weight, for an input that is
// spent: on the CPU the input gradient is written over the input (which must
// be contiguous), elsewhere it is a new tensor.
std::tuple<Tensor, Tensor> conv1x1_backward_over_input(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight);

// Gradients of a bias-free, stride-1 convolution w.r.t. its input and weight:
// on the CPU through oneDNN the weight's first, in a call of its own.
std::tuple<Tensor, Tensor> conv_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight,
    int64_t padding);

} // namespace densenet_efficient::block
