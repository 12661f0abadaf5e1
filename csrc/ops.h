// Typed entry points to the densenet_efficient operators. They go through the
// dispatcher, so the C++ orchestration uses whichever device kernel is
// registered for its tensors (CPU, CUDA) exactly as a Python caller would.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace densenet_efficient::ops {

// Per-channel batch mean and biased variance of an [N, C, *spatial] tensor,
// reduced over every dimension but C, written into `mean` and `var` ([C] each).
void channel_stats_out(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var);

// destination = source, and the per-channel statistics of what was copied,
// in one pass over the data.
void copy_with_stats(
    const at::Tensor& source,
    const at::Tensor& destination,
    const at::Tensor& mean,
    const at::Tensor& var);

// out = relu(weight * (input - mean) / sqrt(var + eps) + bias), per channel,
// written into `out` (any strides).
void bn_relu_out(
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps,
    const at::Tensor& out);

// Gradients of bn_relu. With batch_stats, mean/var are taken to be the batch
// statistics of input and grad_input includes their derivative.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps,
    bool batch_stats);

// As bn_relu_backward, but grad_input is added into `grad_input_sum` in place.
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_accumulate(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps,
    bool batch_stats,
    const at::Tensor& grad_input_sum);

// bn_relu_backward's first pass alone: dγ and dβ of this batch, in the math
// type (float for half/bfloat16).
std::tuple<at::Tensor, at::Tensor> bn_relu_backward_sums(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps);

// bn_relu_backward's second pass alone, with batch statistics: the input
// gradient from dγ and dβ (grad_weight, grad_bias) and the values per channel
// (count, one int64 on the device) of the whole batch, written into
// `grad_input` or added to it.
void bn_relu_backward_input(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias,
    const at::Tensor& count,
    bool accumulate,
    const at::Tensor& grad_input);

} // namespace densenet_efficient::ops
