// What the CPU and CUDA kernels of the per-channel operators share: argument
// checks (so every device rejects bad input with the same message), the plane
// layout test, and the per-channel vectors in math precision.
#pragma once

#include <ATen/core/Tensor.h>

namespace densenet_efficient {

// True when every H×W plane of a 4-D [N, C, H, W] tensor is one contiguous
// run of memory (NCHW-contiguous tensors and channel slices of them), which
// is the layout the kernels address directly.
bool has_contiguous_planes(const at::Tensor& t);

// `t` itself when its planes are contiguous, else a contiguous copy.
at::Tensor with_contiguous_planes(const at::Tensor& t);

void check_channel_stats_args(const at::Tensor& input);

// Checks input (4-D, floating point) and the four per-channel vectors
// (1-D of length C, floating point, on input's device).
void check_bn_relu_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias);

// Checks that `other` (named `name`) matches input in shape, dtype and device.
void check_like_input(
    const char* op,
    const char* name,
    const at::Tensor& input,
    const at::Tensor& other);

// mean, invstd, weight and bias converted to the input's math type (float for
// half/bfloat16, else the input's dtype) and made contiguous; a no-op for
// vectors that already are.
struct ChannelVectors {
  at::Tensor mean, invstd, weight, bias;

  ChannelVectors(
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& invstd,
      const at::Tensor& weight,
      const at::Tensor& bias);
};

} // namespace densenet_efficient
