// The stretches of a DenseNet outside its dense blocks, each one operator
// that keeps only its input for backward and recomputes the rest there:
// * transition: BN-ReLU-Conv1×1-AvgPool2×2. Average pooling and a 1×1
//   convolution are both linear and commute, so it pools first: 4× fewer
//   convolution FLOPs (8× in 3-D) and no full-resolution convolution output.
// * stem: conv0-BN-ReLU-MaxPool, keeping only the image. Backward convolves
//   and normalises again and pools for the max positions: cheaper than
//   keeping conv0's output and int64 indices.
// Batch statistics (in training, or without running statistics) come back
// with the count of values per channel, for update_running_stats.
#include "convolution.h"
#include "dense_block.h"
#include "ops.h"
#include "per_channel_ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <utility>
#include <vector>

namespace densenet_efficient::block {
namespace {

// The norm's statistics: batch statistics of `input` (running_stats empty),
// or its running ones ([mean, var]).
struct NormStats {
  Tensor mean;
  Tensor var;
  bool batch_stats;
};

void check_norm_args(
    const char* op,
    const Tensor& input,
    const Tensor& weight,
    const Tensor& bias,
    at::TensorList running_stats,
    double eps) {
  check_block_rank(op, "input", input);
  TORCH_CHECK_TYPE(
      is_kernel_float(input.scalar_type()), op, ": expected an input of ", kKernelFloats, ", got ",
      input.scalar_type());
  const auto channels = input.size(1);
  for (const auto* t : {&weight, &bias}) {
    TORCH_CHECK_VALUE(
        t->dim() == 1 && t->size(0) == channels, op, ": expected the norm's weight and bias of shape [",
        channels, "] (the input's channels), got ", t->sizes());
  }
  TORCH_CHECK_VALUE(
      running_stats.empty() || running_stats.size() == 2, op,
      ": expected running_stats to be empty (batch statistics) or [running_mean, running_var], got ",
      running_stats.size(), " tensors");
  for (const auto& t : running_stats) {
    TORCH_CHECK_VALUE(
        t.dim() == 1 && t.size(0) == channels, op, ": expected running statistics of shape [", channels,
        "], got ", t.sizes());
  }
  TORCH_CHECK_VALUE(eps > 0, op, ": eps should be positive, got ", eps);
  TORCH_CHECK_VALUE(
      !running_stats.empty() || values_per_channel(input) != 1, op,
      ": Expected more than 1 value per channel when training, got input size ", input.sizes());
}

NormStats batch_or_running_stats(const Tensor& input, at::TensorList running_stats) {
  if (!running_stats.empty()) {
    return {running_stats[0], running_stats[1], false};
  }
  const auto options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  auto mean = at::empty({input.size(1)}, options);
  auto var = at::empty({input.size(1)}, options);
  ops::channel_stats_out(input, mean, var);
  return {mean, var, true};
}

// relu(bn(input)) in the input's memory format (contiguous or channels last).
Tensor bn_relu(const Tensor& input, const NormStats& s, const Tensor& weight, const Tensor& bias, double eps) {
  auto out = at::empty_like(input);
  ops::bn_relu_out(input, s.mean, s.var, weight, bias, eps, out);
  return out;
}

Tensor values_per_channel_tensor(const Tensor& input) {
  return at::scalar_tensor(values_per_channel(input), input.options().dtype(at::kLong));
}

// Pooling of every spatial rank: 2-D and 3-D directly, 1-D as 2-D over
// [N, C, 1, L] (what ATen's 1-D pooling does too).
std::vector<int64_t> expand_1d(at::IntArrayRef v, int64_t first) {
  return {first, v[0]};
}

// 2×2 (2×2×2, 2) average pooling with stride 2, as nn.AvgPool{1,2,3}d(2, 2).
Tensor avg_pool(const Tensor& x) {
  const std::vector<int64_t> two(static_cast<size_t>(x.dim() - 2), 2), zero(two.size(), 0);
  switch (x.dim()) {
    case 3:
      return at::avg_pool2d(x.unsqueeze(2), {1, 2}, {1, 2}, {0, 0}).squeeze(2);
    case 4:
      return at::avg_pool2d(x, two, two, zero);
    default:
      return at::avg_pool3d(x, two, two, zero);
  }
}

// avg_pool's gradient. With even sizes every position lies in one window and
// gets 1/2 (1/4, 1/8) of its window's gradient: written once, in x's memory
// format, with the same rounding as ATen's x / 4 (a power of two). ATen's CPU
// kernels first zero their whole output and then add into it, one more pass
// over the transition's widest map (densenet121's first transition, from
// cold caches: NCHW fp32 2.3 → 1.5 ms, bf16 3.3 → 2.0, NHWC bf16 0.84 → 0.43,
// NHWC fp32 about even). Odd sizes (a last row in no window) go to ATen.
Tensor avg_pool_backward(const Tensor& grad, const Tensor& x) {
  const int64_t dims = x.dim() - 2;
  bool whole_windows = true;
  for (int64_t d = 2; d < x.dim(); ++d) {
    whole_windows = whole_windows && x.size(d) % 2 == 0;
  }
  if (whole_windows) {
    auto grad_input = at::empty(x.sizes(), grad.options().memory_format(x.suggest_memory_format()));
    // grad_input as [N, C, H/2, 2, W/2, 2], grad as [N, C, H/2, 1, W/2, 1]
    // repeated over each window (likewise in 1-D and 3-D).
    std::vector<int64_t> window_sizes{x.size(0), x.size(1)};
    std::vector<int64_t> window_strides{grad_input.stride(0), grad_input.stride(1)};
    std::vector<int64_t> grad_strides{grad.stride(0), grad.stride(1)};
    TORCH_INTERNAL_ASSERT(grad.dim() == x.dim() && grad.size(0) == x.size(0) && grad.size(1) == x.size(1));
    for (int64_t d = 2; d < x.dim(); ++d) {
      TORCH_INTERNAL_ASSERT(grad.size(d) == x.size(d) / 2);
      window_sizes.insert(window_sizes.end(), {x.size(d) / 2, 2});
      window_strides.insert(window_strides.end(), {2 * grad_input.stride(d), grad_input.stride(d)});
      grad_strides.insert(grad_strides.end(), {grad.stride(d), 0});
    }
    auto windows = grad_input.as_strided(window_sizes, window_strides);
    const auto per_window = grad.as_strided(window_sizes, grad_strides);
    const auto share = at::scalar_tensor(1.0 / static_cast<double>(int64_t{1} << dims), grad.options());
    at::mul_out(windows, per_window, share);
    return grad_input;
  }
  const std::vector<int64_t> two(static_cast<size_t>(dims), 2), zero(two.size(), 0);
  switch (x.dim()) {
    case 3:
      return at::avg_pool2d_backward(
                 grad.unsqueeze(2), x.unsqueeze(2), {1, 2}, {1, 2}, {0, 0}, false, true, std::nullopt)
          .squeeze(2);
    case 4:
      return at::avg_pool2d_backward(grad, x, two, two, zero, false, true, std::nullopt);
    default:
      return at::avg_pool3d_backward(grad, x, two, two, zero, false, true, std::nullopt);
  }
}

struct MaxPoolWindow {
  std::vector<int64_t> kernel, stride, padding;
};

MaxPoolWindow checked_window(
    const char* op,
    const Tensor& input,
    at::IntArrayRef kernel,
    at::IntArrayRef stride,
    at::IntArrayRef padding) {
  const auto dims = static_cast<size_t>(input.dim() - 2);
  const std::array<std::pair<const char*, at::IntArrayRef>, 3> windows{
      {{"kernel_size", kernel}, {"stride", stride}, {"padding", padding}}};
  for (const auto& [name, v] : windows) {
    TORCH_CHECK_VALUE(
        v.size() == dims, op, ": expected ", name, " with one value per spatial dimension (", dims,
        "), got ", v);
  }
  if (dims == 1) {
    return {expand_1d(kernel, 1), expand_1d(stride, 1), expand_1d(padding, 0)};
  }
  return {kernel.vec(), stride.vec(), padding.vec()};
}

std::tuple<Tensor, Tensor> max_pool(const Tensor& x, const MaxPoolWindow& w) {
  const std::vector<int64_t> one(w.kernel.size(), 1);
  switch (x.dim()) {
    case 3: {
      auto [out, indices] = at::max_pool2d_with_indices(x.unsqueeze(2), w.kernel, w.stride, w.padding, one);
      return {out.squeeze(2), indices.squeeze(2)};
    }
    case 4:
      return at::max_pool2d_with_indices(x, w.kernel, w.stride, w.padding, one);
    default:
      return at::max_pool3d_with_indices(x, w.kernel, w.stride, w.padding, one);
  }
}

// Max pooling without indices where ATen has such a kernel (forward needs
// only the values).
Tensor max_pool_values(const Tensor& x, const MaxPoolWindow& w) {
  const std::vector<int64_t> one(w.kernel.size(), 1);
  switch (x.dim()) {
    case 3:
      return at::max_pool2d(x.unsqueeze(2), w.kernel, w.stride, w.padding, one).squeeze(2);
    case 4:
      return at::max_pool2d(x, w.kernel, w.stride, w.padding, one);
    default:
      return at::max_pool3d(x, w.kernel, w.stride, w.padding, one);
  }
}

Tensor max_pool_backward(const Tensor& grad, const Tensor& x, const MaxPoolWindow& w, const Tensor& indices) {
  const std::vector<int64_t> one(w.kernel.size(), 1);
  switch (x.dim()) {
    case 3:
      return at::max_pool2d_with_indices_backward(
                 grad.unsqueeze(2), x.unsqueeze(2), w.kernel, w.stride, w.padding, one, false,
                 indices.unsqueeze(2))
          .squeeze(2);
    case 4:
      return at::max_pool2d_with_indices_backward(grad, x, w.kernel, w.stride, w.padding, one, false, indices);
    default:
      return at::max_pool3d_with_indices_backward(grad, x, w.kernel, w.stride, w.padding, one, false, indices);
  }
}

// Statistics as they travel between forward and backward: the batch
// statistics, or (with running statistics) empty vectors.
std::tuple<Tensor, Tensor> returned_stats(const Tensor& input, const NormStats& s) {
  if (s.batch_stats) {
    return {s.mean, s.var};
  }
  const auto empty = at::empty({0}, input.options().dtype(at::toOpMathType(input.scalar_type())));
  return {empty, empty.clone()};
}

NormStats saved_stats(
    const char* op,
    const Tensor& input,
    at::TensorList running_stats,
    const Tensor& batch_mean,
    const Tensor& batch_var) {
  if (!running_stats.empty()) {
    return {running_stats[0], running_stats[1], false};
  }
  const std::vector<int64_t> shape{input.size(1)};
  TORCH_CHECK_VALUE(
      batch_mean.sizes() == shape && batch_var.sizes() == shape, op, ": expected batch statistics of shape ",
      shape, ", got ", batch_mean.sizes(), " and ", batch_var.sizes());
  return {batch_mean, batch_var, true};
}

// A transition's or stem's conv weight beside its input: the input's dtype,
// or float32 beside half/bfloat16 maps (autocast), cast for each call as a
// block casts its layers' (with_dtype_of); its gradient comes back in it.
void check_conv_weight_dtype(const char* op, const Tensor& input, const Tensor& conv_weight) {
  TORCH_CHECK_TYPE(
      is_parameter_dtype(conv_weight.scalar_type(), input), op, ": the conv weight has dtype ",
      conv_weight.scalar_type(), " but the input has dtype ", input.scalar_type(), "; expected ",
      parameter_dtypes(input));
}

// --- transition -------------------------------------------------------------

void check_transition_conv(const char* op, const Tensor& input, const Tensor& conv_weight) {
  std::vector<int64_t> expected(static_cast<size_t>(input.dim()), 1);
  expected[0] = conv_weight.dim() > 0 ? conv_weight.size(0) : 0;
  expected[1] = input.size(1);
  TORCH_CHECK_VALUE(
      conv_weight.sizes() == at::IntArrayRef(expected), op, ": expected a 1×1 conv weight of shape [out, ",
      input.size(1), ", 1, ...] (", input.dim(), "-D, like the input), got ", conv_weight.sizes());
  check_conv_weight_dtype(op, input, conv_weight);
}

// The pooled BN-ReLU output in the transition's memory format (ATen's CPU
// 3-D average pooling gives channels_last_3d input a contiguous output).
Tensor pooled_in(at::MemoryFormat format, const Tensor& normalized) {
  return avg_pool(normalized).contiguous(format);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> transition_forward(
    const Tensor& input_,
    const Tensor& weight,
    const Tensor& bias,
    at::TensorList running_stats,
    double eps,
    const Tensor& conv_weight) {
  constexpr const char* op = "transition_forward";
  check_norm_args(op, input_, weight, bias, running_stats, eps);
  check_transition_conv(op, input_, conv_weight);
  // In the input's memory format, as a block computes (dense_block.h), once
  // and not in each pass over it.
  const auto format = block_memory_format(input_);
  const auto input = input_.contiguous(format);
  const auto stats = batch_or_running_stats(input, running_stats);
  const auto pooled = pooled_in(format, bn_relu(input, stats, weight, bias, eps));
  auto [mean, var] = returned_stats(input, stats);
  // In that format whatever the weight's layout, as the fake kernel says.
  return {conv1x1(pooled, with_dtype_of(conv_weight, pooled)).contiguous(format), mean, var,
          values_per_channel_tensor(input)};
}

// With z = relu(bn(x)) and y = conv(pool(z)): dW = conv's weight gradient at
// pool(z), dz = pool_backward(Wᵀ·dy), then BN-ReLU's backward.
std::tuple<Tensor, Tensor, Tensor, Tensor> transition_backward(
    const Tensor& grad_output,
    const Tensor& input_,
    const Tensor& weight,
    const Tensor& bias,
    at::TensorList running_stats,
    double eps,
    const Tensor& conv_weight,
    const Tensor& batch_mean,
    const Tensor& batch_var) {
  constexpr const char* op = "transition_backward";
  check_norm_args(op, input_, weight, bias, running_stats, eps);
  check_transition_conv(op, input_, conv_weight);
  const auto format = block_memory_format(input_);
  const auto input = input_.contiguous(format);
  const auto stats = saved_stats(op, input, running_stats, batch_mean, batch_var);
  Tensor grad_normalized, grad_conv_weight;
  {
    // The full-resolution BN-ReLU output lives only until it is pooled, the
    // pooled one and its gradient until they are un-pooled: the pooling's
    // backward needs just the shape, which is the input's.
    const auto pooled = pooled_in(format, bn_relu(input, stats, weight, bias, eps));
    TORCH_CHECK_VALUE(
        grad_output.dim() == input.dim() && grad_output.size(0) == input.size(0) &&
            grad_output.size(1) == conv_weight.size(0) && grad_output.sizes().slice(2) == pooled.sizes().slice(2),
        op, ": grad_output has shape ", grad_output.sizes(), ", expected that of the output");
    Tensor grad_pooled;
    std::tie(grad_pooled, grad_conv_weight) =
        conv1x1_backward_over_input(grad_output.contiguous(format), pooled, with_dtype_of(conv_weight, pooled));
    grad_normalized = avg_pool_backward(grad_pooled, input);
  }
  auto [grad_input, grad_weight, grad_bias] = ops::bn_relu_backward(
      grad_normalized, input, stats.mean, stats.var, weight, bias, eps, stats.batch_stats);
  return {grad_input.contiguous(format), grad_weight, grad_bias, weight_gradient(grad_conv_weight, conv_weight)};
}

// --- stem ---------------------------------------------------------------------

struct StemConv {
  std::vector<int64_t> stride, padding, dilation, output_padding;
};

StemConv checked_stem_conv(
    const char* op,
    const Tensor& image,
    const Tensor& conv_weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding) {
  const auto dims = image.dim() - 2;
  TORCH_CHECK_VALUE(
      dims >= kMinSpatialDims && dims <= kMaxSpatialDims, op, ": expected a 3-D, 4-D or 5-D input, got ",
      image.sizes());
  TORCH_CHECK_VALUE(
      conv_weight.dim() == image.dim() && conv_weight.size(1) == image.size(1), op,
      ": expected a conv0 weight [out, ", image.size(1), ", *kernel] of ", image.dim(), " dimensions, got ",
      conv_weight.sizes());
  check_conv_weight_dtype(op, image, conv_weight);
  TORCH_CHECK_VALUE(
      static_cast<int64_t>(stride.size()) == dims && static_cast<int64_t>(padding.size()) == dims, op,
      ": expected conv0's stride and padding with one value per spatial dimension (", dims, "), got ",
      stride, " and ", padding);
  const std::vector<int64_t> one(static_cast<size_t>(dims), 1), zero(static_cast<size_t>(dims), 0);
  return {stride.vec(), padding.vec(), one, zero};
}

// The stem computes in the memory format ATen's convolution would give
// conv0's output: channels last when the image or conv0's weight is (a
// channels-last model turns a contiguous image into channels-last maps at
// conv0), so a channels-last model's blocks all compute channels last.
at::MemoryFormat stem_memory_format(const Tensor& image, const Tensor& weight) {
  const auto format = block_memory_format(image);
  return format != at::MemoryFormat::Contiguous ? format : block_memory_format(weight);
}

// conv0 on the image and its weight in the stem's memory format: a
// channels-last weight would otherwise decide the output's layout, and
// copying the image (a few channels) is cheaper than copying conv0's output.
Tensor stem_conv(const Tensor& image, const Tensor& weight, const StemConv& c, at::MemoryFormat format) {
  return at::convolution(
             image.contiguous(format), weight_operand(with_dtype_of(weight, image), format), std::nullopt, c.stride,
             c.padding, c.dilation, false, c.output_padding, 1)
      .contiguous(format);
}

// What forward and backward both start from: the arguments checked, and
// conv0's output (in the image's memory format, once, not in each pass over it).
struct StemStart {
  StemConv conv;
  Tensor input;
  MaxPoolWindow window;
};

StemStart stem_start(
    const char* op,
    const Tensor& image,
    const Tensor& conv_weight,
    at::IntArrayRef conv_stride,
    at::IntArrayRef conv_padding,
    const Tensor& weight,
    const Tensor& bias,
    at::TensorList running_stats,
    double eps,
    at::IntArrayRef kernel_size,
    at::IntArrayRef stride,
    at::IntArrayRef padding) {
  auto conv = checked_stem_conv(op, image, conv_weight, conv_stride, conv_padding);
  auto input = stem_conv(image, conv_weight, conv, stem_memory_format(image, conv_weight));
  check_norm_args(op, input, weight, bias, running_stats, eps);
  auto window = checked_window(op, input, kernel_size, stride, padding);
  return {std::move(conv), std::move(input), std::move(window)};
}

// conv0 → norm0 → relu0 → pool0 in one operator that keeps only the image:
// conv0's output (the largest activation of an ImageNet DenseNet) is
// computed again in backward, at the cost of one conv0.
std::tuple<Tensor, Tensor, Tensor, Tensor> stem_forward(
    const Tensor& image,
    const Tensor& conv_weight,
    at::IntArrayRef conv_stride,
    at::IntArrayRef conv_padding,
    const Tensor& weight,
    const Tensor& bias,
    at::TensorList running_stats,
    double eps,
    at::IntArrayRef kernel_size,
    at::IntArrayRef stride,
    at::IntArrayRef padding) {
  const auto [conv, input, window] = stem_start(
      "stem_forward", image, conv_weight, conv_stride, conv_padding, weight, bias, running_stats, eps,
      kernel_size, stride, padding);
  const auto stats = batch_or_running_stats(input, running_stats);
  auto output = max_pool_values(bn_relu(input, stats, weight, bias, eps), window);
  auto [mean, var] = returned_stats(input, stats);
  return {output, mean, var, values_per_channel_tensor(input)};
}

// x = conv0(image) and z = relu(bn(x)) again; z's max positions (bit-identical
// to forward's) route the output gradient back; then BN-ReLU's backward and
// conv0's (the image's gradient only when asked for).
std::tuple<Tensor, Tensor, Tensor, Tensor> stem_backward(
    const Tensor& grad_output,
    const Tensor& image,
    const Tensor& conv_weight,
    at::IntArrayRef conv_stride,
    at::IntArrayRef conv_padding,
    const Tensor& weight,
    const Tensor& bias,
    at::TensorList running_stats,
    double eps,
    at::IntArrayRef kernel_size,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    const Tensor& batch_mean,
    const Tensor& batch_var,
    bool image_grad) {
  constexpr const char* op = "stem_backward";
  const auto format = stem_memory_format(image, conv_weight);
  StemConv conv;
  Tensor grad_input, grad_weight, grad_bias;
  {
    auto start = stem_start(
        op, image, conv_weight, conv_stride, conv_padding, weight, bias, running_stats, eps, kernel_size,
        stride, padding);
    conv = std::move(start.conv);
    const auto& input = start.input;
    const auto& window = start.window;
    const auto stats = saved_stats(op, input, running_stats, batch_mean, batch_var);
    Tensor grad_normalized;
    {
      // The BN-ReLU output lives only until pooled, its max positions until
      // they route the gradient: the pooling's backward needs just the shape,
      // which is the input's.
      const auto [output, indices] = max_pool(bn_relu(input, stats, weight, bias, eps), window);
      TORCH_CHECK_VALUE(
          grad_output.sizes() == output.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
          ", expected the output's ", output.sizes());
      grad_normalized = max_pool_backward(grad_output, input, window, indices);
    }
    std::tie(grad_input, grad_weight, grad_bias) = ops::bn_relu_backward(
        grad_normalized, input, stats.mean, stats.var, weight, bias, eps, stats.batch_stats);
  }  // conv0's output, made again, is no longer needed: only the image is
  // The operands as in forward; the gradients in their layouts, as the fake kernel says.
  auto [grad_image, grad_conv_weight, unused_grad_bias] = at::convolution_backward(
      grad_input, image.contiguous(format), weight_operand(with_dtype_of(conv_weight, image), format), std::nullopt,
      conv.stride, conv.padding, conv.dilation, false, conv.output_padding, 1, {image_grad, true, false});
  // Not asked for: an empty tensor (a schema's Tensor is never undefined).
  grad_image = grad_image.defined() ? grad_image.contiguous(format) : at::empty({0}, image.options());
  return {grad_image, weight_gradient(grad_conv_weight, conv_weight), grad_weight, grad_bias};
}

} // namespace

TORCH_LIBRARY_IMPL(densenet_efficient, CompositeExplicitAutograd, m) {
  m.impl("transition_forward", &transition_forward);
  m.impl("transition_backward", &transition_backward);
  m.impl("stem_forward", &stem_forward);
  m.impl("stem_backward", &stem_backward);
}

} // namespace densenet_efficient::block
