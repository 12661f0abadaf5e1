// What the CPU and CUDA kernels of the per-channel operators share: argument
// checks (so every device rejects bad input with the same message), the plane
// layout test, and the per-channel vectors in math precision.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

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

// The host side of the per-channel operators, the same on every device:
// argument checks, device guard, output allocation, empty inputs, and
// destinations whose planes are not contiguous. `Kernels` is a device's:
//   static void channel_stats(input, mean, var)                  M > 0
//   static void bn_relu(input, vectors, out)                      non-empty
//   template <bool accumulate> static void backward(grad_output, input,
//       vectors, batch_stats, grad_input, grad_weight, grad_bias)  M > 0
// with input and every written tensor of contiguous planes, grad_weight and
// grad_bias in the math type.
template <typename Kernels>
struct PerChannelOps {
  static std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& input_) {
    check_channel_stats_args(input_);
    const c10::DeviceGuard guard(input_.device());
    const auto input = with_contiguous_planes(input_);
    auto [mean, var] = math_vectors(input);
    if (input.numel() == 0) {  // statistics of nothing, as torch.mean/var say
      mean.fill_(std::numeric_limits<double>::quiet_NaN());
      var.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      Kernels::channel_stats(input, mean, var);
    }
    return {mean, var};
  }

  static void bn_relu_out(
      const at::Tensor& input_,
      const at::Tensor& mean,
      const at::Tensor& invstd,
      const at::Tensor& weight,
      const at::Tensor& bias,
      const at::Tensor& out) {
    check_bn_relu_args("bn_relu", input_, mean, invstd, weight, bias);
    check_like_input("bn_relu", "out", input_, out);
    const c10::DeviceGuard guard(input_.device());
    if (input_.numel() == 0) {
      return;
    }
    const auto input = with_contiguous_planes(input_);
    const ChannelVectors vectors(input, mean, invstd, weight, bias);
    if (has_contiguous_planes(out)) {
      Kernels::bn_relu(input, vectors, out);
    } else {
      const auto planes = at::empty_like(input, at::MemoryFormat::Contiguous);
      Kernels::bn_relu(input, vectors, planes);
      out.copy_(planes);
    }
  }

  static at::Tensor bn_relu(
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& invstd,
      const at::Tensor& weight,
      const at::Tensor& bias) {
    auto out = at::empty_like(input, at::MemoryFormat::Contiguous);
    bn_relu_out(input, mean, invstd, weight, bias, out);
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& invstd,
      const at::Tensor& weight,
      const at::Tensor& bias,
      bool batch_stats) {
    check_bn_relu_args("bn_relu_backward", input, mean, invstd, weight, bias);
    check_like_input("bn_relu_backward", "grad_output", input, grad_output);
    const c10::DeviceGuard guard(input.device());
    auto grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
    auto [grad_weight, grad_bias] = math_vectors(input);
    backward<false>(
        grad_output, input, mean, invstd, weight, bias, batch_stats, grad_input,
        grad_weight, grad_bias);
    return {
        grad_input, grad_weight.to(weight.scalar_type()),
        grad_bias.to(bias.scalar_type())};
  }

  static std::tuple<at::Tensor, at::Tensor> bn_relu_backward_accumulate(
      const at::Tensor& grad_output,
      const at::Tensor& input,
      const at::Tensor& mean,
      const at::Tensor& invstd,
      const at::Tensor& weight,
      const at::Tensor& bias,
      bool batch_stats,
      at::Tensor& grad_input_sum) {
    constexpr const char* op = "bn_relu_backward_accumulate";
    check_bn_relu_args(op, input, mean, invstd, weight, bias);
    check_like_input(op, "grad_output", input, grad_output);
    check_like_input(op, "grad_input_sum", input, grad_input_sum);
    const c10::DeviceGuard guard(input.device());
    auto [grad_weight, grad_bias] = math_vectors(input);
    if (has_contiguous_planes(grad_input_sum)) {
      backward<true>(
          grad_output, input, mean, invstd, weight, bias, batch_stats,
          grad_input_sum, grad_weight, grad_bias);
    } else {
      auto grad_input = at::empty_like(input, at::MemoryFormat::Contiguous);
      backward<false>(
          grad_output, input, mean, invstd, weight, bias, batch_stats,
          grad_input, grad_weight, grad_bias);
      grad_input_sum.add_(grad_input);
    }
    return {grad_weight.to(weight.scalar_type()), grad_bias.to(bias.scalar_type())};
  }

 private:
  // Two per-channel vectors in the input's math type.
  static std::tuple<at::Tensor, at::Tensor> math_vectors(const at::Tensor& input) {
    const auto options = input.options().dtype(at::toOpMathType(input.scalar_type()));
    return {at::empty({input.size(1)}, options), at::empty({input.size(1)}, options)};
  }

  template <bool accumulate>
  static void backward(
      const at::Tensor& grad_output,
      const at::Tensor& input_,
      const at::Tensor& mean,
      const at::Tensor& invstd,
      const at::Tensor& weight,
      const at::Tensor& bias,
      bool batch_stats,
      const at::Tensor& grad_input,
      const at::Tensor& grad_weight,
      const at::Tensor& grad_bias) {
    if (input_.numel() == 0) {  // empty sums; the statistics (NaN) must not leak in
      grad_weight.zero_();
      grad_bias.zero_();
      return;
    }
    const auto input = with_contiguous_planes(input_);
    Kernels::template backward<accumulate>(
        with_contiguous_planes(grad_output), input,
        ChannelVectors(input, mean, invstd, weight, bias), batch_stats,
        grad_input, grad_weight, grad_bias);
  }
};

// Registers PerChannelOps<Kernels> for the dispatch key of `m`.
template <typename Kernels>
void register_per_channel_ops(torch::Library& m) {
  using Ops = PerChannelOps<Kernels>;
  m.impl("channel_stats", &Ops::channel_stats);
  m.impl("bn_relu", &Ops::bn_relu);
  m.impl("bn_relu_out", &Ops::bn_relu_out);
  m.impl("bn_relu_backward", &Ops::bn_relu_backward);
  m.impl("bn_relu_backward_accumulate", &Ops::bn_relu_backward_accumulate);
}

} // namespace densenet_efficient
