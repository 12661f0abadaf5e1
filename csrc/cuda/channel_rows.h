// CUDA kernels of the per-channel operators on tensors with channel rows
// (has_channel_rows: channels-last tensors and channel slices of them), which
// they walk as N·P rows of C values a row stride apart: the threads of a warp
// take 32 consecutive channels of a row, so every load is coalesced whatever
// the stride (launch_plan.h, plan_rows). Reductions are deterministic: each
// block sums its chunk of rows per channel in a fixed order, and the
// finalize kernels of bn_relu_math.cuh merge the chunks in order. Every
// tensor a kernel takes has channel rows; [C] vectors are contiguous in the
// math type. The arithmetic is the plane walk's (bn_relu_math.cuh): the
// forward's affine step and the ReLU gate round alike, so bn_relu equals the
// plane walk bit for bit (backward's sums come in another order).
#pragma once

#include "../per_channel_ops.h"

#include <ATen/core/Tensor.h>

namespace densenet_efficient::gpu {

// The CUDA kernels' channel-row walk; CudaKernels (bn_relu_kernel.cu) adds
// the plane walk. The same members as the CPU's (cpu/channel_rows.h).
struct ChannelRowKernels {
  static constexpr bool kChannelRows = true;

  static void channel_stats_rows(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var);

  static void copy_with_stats_rows(
      const at::Tensor& source,
      const at::Tensor& destination,
      const at::Tensor& mean,
      const at::Tensor& var);

  static void bn_relu_rows(const at::Tensor& input, const ChannelVectors& vectors, double eps, const at::Tensor& out);

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

  static void grad_sums_rows(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const ChannelVectors& vectors,
      double eps,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias);

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

} // namespace densenet_efficient::gpu
