#include "bn_relu_common.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

namespace densenet_efficient {

bool has_contiguous_planes(const at::Tensor& t) {
  return t.dim() == 4 && (t.size(3) <= 1 || t.stride(3) == 1) &&
      (t.size(2) <= 1 || t.stride(2) == t.size(3));
}

at::Tensor with_contiguous_planes(const at::Tensor& t) {
  return has_contiguous_planes(t) ? t : t.contiguous();
}

namespace {
void check_4d_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(
      t.dim() == 4, op, ": expected ", name,
      " to be a 4-D tensor [N, C, H, W], got a ", t.dim(),
      "-D tensor of shape ", t.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(t.scalar_type()), op, ": expected ", name,
      " to be floating point, got ", t.scalar_type());
}

void check_channel_vector(
    const char* op,
    const char* name,
    const at::Tensor& input,
    const at::Tensor& v) {
  const auto channels = input.size(1);
  TORCH_CHECK_VALUE(
      v.dim() == 1 && v.size(0) == channels, op, ": expected ", name,
      " of shape [", channels, "] (one value per input channel), got shape ",
      v.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(v.scalar_type()), op, ": expected ", name,
      " to be floating point, got ", v.scalar_type());
  TORCH_CHECK(
      v.device() == input.device(), op, ": expected ", name,
      " on the input's device ", input.device(), ", got it on ", v.device());
}
} // namespace

void check_channel_stats_args(const at::Tensor& input) {
  check_4d_floating("channel_stats", "input", input);
}

void check_bn_relu_args(
    const char* op,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias) {
  check_4d_floating(op, "input", input);
  check_channel_vector(op, "mean", input, mean);
  check_channel_vector(op, "invstd", input, invstd);
  check_channel_vector(op, "weight", input, weight);
  check_channel_vector(op, "bias", input, bias);
}

void check_like_input(
    const char* op,
    const char* name,
    const at::Tensor& input,
    const at::Tensor& other) {
  TORCH_CHECK_VALUE(
      other.sizes() == input.sizes(), op, ": expected ", name, " of shape ",
      input.sizes(), " (the input's), got ", other.sizes());
  TORCH_CHECK_TYPE(
      other.scalar_type() == input.scalar_type(), op, ": expected ", name,
      " of dtype ", input.scalar_type(), " (the input's), got ",
      other.scalar_type());
  TORCH_CHECK(
      other.device() == input.device(), op, ": expected ", name,
      " on the input's device ", input.device(), ", got it on ",
      other.device());
}

ChannelVectors::ChannelVectors(
    const at::Tensor& input,
    const at::Tensor& mean_,
    const at::Tensor& invstd_,
    const at::Tensor& weight_,
    const at::Tensor& bias_) {
  const auto math = at::toOpMathType(input.scalar_type());
  const auto convert = [math](const at::Tensor& v) {
    return v.to(math).contiguous();
  };
  mean = convert(mean_);
  invstd = convert(invstd_);
  weight = convert(weight_);
  bias = convert(bias_);
}

} // namespace densenet_efficient
