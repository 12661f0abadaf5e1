// CPU kernels of the per-channel operators on tensors with channel rows
// (has_channel_rows: channels_last tensors and channel slices of them), which
// they walk as N·P rows of C values, a row stride apart: each row's channels
// are one vectorised run. Reductions accumulate each channel in the math type
// over chunks of rows (threads take chunks and blocks of channels) and add
// the chunks up in double, in a fixed order (any number of threads gives the
// same result). Every tensor a kernel takes has
// channel rows; [C] vectors are contiguous in the math type.
#pragma once

#include "../per_channel_ops.h"

#include <ATen/core/Tensor.h>

namespace densenet_efficient::cpu {

// The CPU kernels' channel-row walk; CpuKernels (bn_relu_kernel.cpp) adds
// the plane walk.
struct ChannelRowKernels {
  static constexpr bool kChannelRows = true;

  // Mean and biased variance per channel.
  static void channel_stats_rows(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var);

  // The same, of what it copies into `destination`.
  static void copy_with_stats_rows(
      const at::Tensor& source,
      const at::Tensor& destination,
      const at::Tensor& mean,
      const at::Tensor& var);

  static void bn_relu_rows(const at::Tensor& input, const ChannelVectors& vectors, double eps, const at::Tensor& out);

  // Both passes of backward (bn_relu_kernel.cpp derives them); `accumulate`
  // adds dx into grad_input.
  static void backward_rows(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      bool batch_stats,
      bool accumulate,
      const at::Tensor& grad_input,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias);

  // Pass 1 alone: dγ and dβ.
  static void grad_sums_rows(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias);

  // Pass 2 alone, from the sums and count of a whole (global) batch.
  static void grad_input_rows(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      const AffineGradients& sums,
      const at::Tensor& count,
      bool accumulate,
      const at::Tensor& grad_input);
};

} // namespace densenet_efficient::cpu
