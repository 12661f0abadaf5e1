// dense_block_backward: the efficient block's backward pass, layers in
// reverse (docs/design.md). The BN-ReLU outputs are recomputed into shared
// scratch buffers and every layer's input gradient is accumulated in place
// into one gradient buffer.
#include "convolution.h"
#include "dense_block.h"
#include "dense_block_sync.h"
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace densenet_efficient::block {
namespace {

using BackwardResult = std::tuple<
    Tensor,
    std::vector<Tensor>,
    std::vector<Tensor>,
    std::vector<Tensor>,
    std::vector<Tensor>,
    std::vector<Tensor>,
    std::vector<Tensor>>;

BackwardResult dense_block_backward(
    const Tensor& grad_output,
    const Tensor& output,
    at::TensorList norm1_weight,
    at::TensorList norm1_bias,
    const OptionalTensors& norm1_running_mean,
    const OptionalTensors& norm1_running_var,
    at::ArrayRef<double> norm1_eps,
    at::TensorList conv1_weight,
    at::TensorList norm2_weight,
    at::TensorList norm2_bias,
    const OptionalTensors& norm2_running_mean,
    const OptionalTensors& norm2_running_var,
    at::ArrayRef<double> norm2_eps,
    at::TensorList conv2_weight,
    at::TensorList bottlenecks,
    const Tensor& batch_mean,
    const Tensor& batch_var,
    const Tensor& count,
    at::TensorList dropout_masks,
    double dropout_p,
    bool dropout_whole_channels,
    c10::string_view sync_group) {
  constexpr const char* op = "dense_block_backward";
  check_block_rank(op, "output", output);
  TORCH_CHECK_VALUE(
      !conv1_weight.empty() && conv1_weight[0].dim() >= 2, op,
      ": expected at least one layer with a conv1 weight [out, in, *kernel]");
  const Block block = make_block(
      op,
      {norm1_weight, norm1_bias, norm1_running_mean, norm1_running_var,
       norm1_eps, conv1_weight, norm2_weight, norm2_bias, norm2_running_mean,
       norm2_running_var, norm2_eps, conv2_weight},
      output, conv1_weight[0].size(1));
  const auto num_layers = block.num_layers();
  TORCH_CHECK_VALUE(
      output.size(1) == block.out_channels(), op, ": expected a block output with ",
      block.out_channels(), " channels, got ", output.sizes());
  TORCH_CHECK_VALUE(
      grad_output.sizes() == output.sizes(), op, ": grad_output has shape ",
      grad_output.sizes(), " but the block output has shape ", output.sizes());
  TORCH_CHECK_TYPE(
      grad_output.scalar_type() == output.scalar_type() && grad_output.device() == output.device(), op,
      ": expected grad_output of dtype ", output.scalar_type(), " on ", output.device(), " like the output, got ",
      grad_output.scalar_type(), " on ", grad_output.device());
  TORCH_CHECK_VALUE(
      bottlenecks.empty() ||
          static_cast<int64_t>(bottlenecks.size()) == num_layers,
      op, ": expected no saved bottlenecks (recompute) or one per layer (",
      num_layers, "), got ", bottlenecks.size());
  TORCH_CHECK_VALUE(
      dropout_p == 0 ||
          static_cast<int64_t>(dropout_masks.size()) == num_layers,
      op, ": expected one dropout mask per layer (", num_layers, "), got ",
      dropout_masks.size());
  if (dropout_p > 0) {
    // What dropout_with_mask kept: the scaled noise [N, k, 1, ...] in the
    // features' dtype, or a bool mask of the new features' shape.
    auto expected = maps_shape(output, block.growth_rate);
    if (dropout_whole_channels) {
      std::fill(expected.begin() + 2, expected.end(), 1);
    }
    const auto dtype = dropout_whole_channels ? output.scalar_type() : at::kBool;
    for (const auto& mask : dropout_masks) {
      TORCH_CHECK_VALUE(
          mask.sizes() == at::IntArrayRef(expected) && mask.scalar_type() == dtype, op,
          ": expected dropout masks of shape ", at::IntArrayRef(expected), " and dtype ", dtype, ", got ", mask.sizes(),
          " and ", mask.scalar_type());
    }
  }
  const std::vector<int64_t> stats_shape{BlockStats::size(block)};
  TORCH_CHECK_VALUE(
      batch_mean.sizes() == stats_shape && batch_var.sizes() == stats_shape, op,
      ": expected saved statistics of shape ", stats_shape, ", got ", batch_mean.sizes(),
      " and ", batch_var.sizes());
  TORCH_CHECK_VALUE(
      count.numel() == 1, op, ": expected count to hold one value, got shape ", count.sizes());

  const auto growth = block.growth_rate;
  const BlockStats stats{batch_mean, batch_var, block.max_in_channels(), block.bottleneck_width};
  const SyncBatchNorm sync{sync_group};
  // The last layer's new channels feed no later layer: their gradient is
  // grad_output's own, and the gradient buffer holds the channels some norm1
  // reads.
  const auto format = block_memory_format(output);  // the forward's: its output is in it
  auto grad_features = empty_maps(output, block.max_in_channels(), format);
  grad_features.copy_(range_of(grad_output, 1, 0, block.max_in_channels()));
  // A recomputed bottleneck is computed from norm1's output while norm2's is
  // needed: then they take two scratches.
  const bool recompute = bottlenecks.empty();
  const auto scratch = at::empty(
      {values_per_channel(output) * (recompute ? block.max_in_channels() : block.scratch_channels())},
      output.options());
  const auto norm2_scratch = recompute
      ? at::empty({values_per_channel(output) * block.bottleneck_width}, output.options())
      : scratch;

  const auto bottleneck_layers = block.has_bottleneck() ? num_layers : 0;
  std::vector<Tensor> grad_norm1_weight(num_layers), grad_norm1_bias(num_layers),
      grad_conv1_weight(num_layers), grad_norm2_weight(bottleneck_layers),
      grad_norm2_bias(bottleneck_layers), grad_conv2_weight(bottleneck_layers);
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const auto& layer = block.layers[l];
    const auto channels = block.in_channels(l);
    // Every later layer has already added its share: this slice is complete.
    auto grad_new_features = l + 1 == num_layers
        ? range_of(grad_output, 1, channels, growth)
        : range_of(grad_features, 1, channels, growth);
    if (dropout_p > 0) {
      grad_new_features =
          dropout_backward(grad_new_features, dropout_masks[l], dropout_p, dropout_whole_channels);
    }
    const auto features = range_of(output, 1, 0, channels);
    const auto norm1 = norm1_normalization(block, l, stats);
    const auto norm1_out = scratch_view(scratch, maps_shape(output, channels), format);
    // This layer's weights as the forward convolved with them.
    const auto conv1_weight = with_dtype_of(layer.conv1_weight, output);
    const auto conv2_weight = block.has_bottleneck() ? with_dtype_of(layer.conv2_weight, output) : Tensor();

    Tensor grad_norm1_out;
    if (block.has_bottleneck()) {
      Tensor grad_bottleneck;
      {
        // A recomputed bottleneck, norm2's output gradient and norm2's output
        // die with this scope, before the 1×1 convolution's backward.
        Tensor bottleneck;
        if (recompute) {
          apply_bn_relu(layer.norm1, norm1, features, norm1_out);
          bottleneck = conv1x1(norm1_out, conv1_weight);
        } else {
          bottleneck = bottlenecks[l];
        }
        const auto norm2 = norm2_normalization(block, l, stats);
        const auto norm2_out = scratch_view(norm2_scratch, bottleneck.sizes(), format);
        apply_bn_relu(layer.norm2, norm2, bottleneck, norm2_out);
        Tensor grad_norm2_out;
        std::tie(grad_norm2_out, grad_conv2_weight[l]) =
            conv_backward(grad_new_features, norm2_out, conv2_weight, 1);
        if (sync.enabled() && layer.norm2.uses_batch_stats()) {
          grad_bottleneck = empty_maps(bottleneck, bottleneck.size(1), format);
          std::tie(grad_norm2_weight[l], grad_norm2_bias[l]) = sync.bn_relu_backward(
              grad_norm2_out, bottleneck, norm2, layer.norm2, count, grad_bottleneck, /*accumulate=*/false);
        } else {
          std::tie(grad_bottleneck, grad_norm2_weight[l], grad_norm2_bias[l]) = ops::bn_relu_backward(
              grad_norm2_out, bottleneck, norm2.mean, norm2.var, layer.norm2.weight, layer.norm2.bias,
              norm2.eps, layer.norm2.uses_batch_stats());
        }
      }
      if (!recompute) {
        // norm2's output is spent: norm1's takes the scratch back.
        apply_bn_relu(layer.norm1, norm1, features, norm1_out);
      }
      // norm1's output is spent after this: on the CPU its scratch takes the
      // input gradient.
      std::tie(grad_norm1_out, grad_conv1_weight[l]) =
          conv1x1_backward_over_input(grad_bottleneck, norm1_out, conv1_weight);
    } else {
      apply_bn_relu(layer.norm1, norm1, features, norm1_out);
      std::tie(grad_norm1_out, grad_conv1_weight[l]) =
          conv_backward(grad_new_features, norm1_out, conv1_weight, 1);
    }
    grad_conv1_weight[l] = weight_gradient(grad_conv1_weight[l], layer.conv1_weight);
    if (block.has_bottleneck()) {
      grad_conv2_weight[l] = weight_gradient(grad_conv2_weight[l], layer.conv2_weight);
    }
    auto grad_features_in = range_of(grad_features, 1, 0, channels);
    if (sync.enabled() && layer.norm1.uses_batch_stats()) {
      std::tie(grad_norm1_weight[l], grad_norm1_bias[l]) = sync.bn_relu_backward(
          grad_norm1_out, features, norm1, layer.norm1, count, grad_features_in, /*accumulate=*/true);
    } else {
      std::tie(grad_norm1_weight[l], grad_norm1_bias[l]) =
          ops::bn_relu_backward_accumulate(
              grad_norm1_out, features, norm1.mean, norm1.var, layer.norm1.weight,
              layer.norm1.bias, norm1.eps, layer.norm1.uses_batch_stats(), grad_features_in);
    }
  }
  auto grad_input = range_of(grad_features, 1, 0, block.num_input_features).contiguous(format);
  return {
      grad_input,
      grad_norm1_weight,
      grad_norm1_bias,
      grad_conv1_weight,
      grad_norm2_weight,
      grad_norm2_bias,
      grad_conv2_weight};
}

} // namespace

TORCH_LIBRARY_IMPL(densenet_efficient, CompositeExplicitAutograd, m) {
  m.impl("dense_block_backward", &dense_block_backward);
}

} // namespace densenet_efficient::block
