// dense_block_forward: the per-layer loop of the efficient block's forward
// pass (docs/design.md). Every layer writes its k new channels into one block
// buffer (the block's output) together with their batch statistics, computed
// once per channel; per layer only the bottleneck output is kept (or nothing,
// when it is recomputed).
#include "convolution.h"
#include "dense_block.h"
#include "dense_block_sync.h"
#include "ops.h"
#include "per_channel_ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace densenet_efficient::block {
namespace {

// Writes `features` into channels [start, start + k) of the block buffer; with
// `stats`, also their batch statistics (merged across ranks when
// synchronised), in the same pass over the data.
void store_features(
    const Tensor& features,
    const Tensor& output,
    int64_t start,
    const BlockStats* stats,
    const SyncBatchNorm& sync,
    const Tensor& count) {
  const auto length = features.size(1);
  const auto destination = range_of(output, 1, start, length);
  if (stats == nullptr) {
    destination.copy_(features);
    return;
  }
  const auto mean = BlockStats::slice(stats->mean, start, length);
  const auto var = BlockStats::slice(stats->var, start, length);
  ops::copy_with_stats(features, destination, mean, var);
  if (sync.enabled()) {
    sync.merge(mean, var, values_per_channel(features), count);
  }
}

using ForwardResult =
    std::tuple<Tensor, std::vector<Tensor>, Tensor, Tensor, Tensor, std::vector<Tensor>>;

ForwardResult dense_block_forward(
    const Tensor& input,
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
    double dropout_p,
    bool dropout_whole_channels,
    bool recompute_bottleneck,
    bool save_for_backward,
    c10::string_view sync_group) {
  constexpr const char* op = "dense_block_forward";
  check_block_rank(op, "input", input);
  TORCH_CHECK_TYPE(
      is_kernel_float(input.scalar_type()), op, ": expected an input of ", kKernelFloats, ", got ",
      input.scalar_type());
  TORCH_CHECK_VALUE(
      !conv1_weight.empty(), op, ": a dense block needs at least one layer");
  TORCH_CHECK_VALUE(
      conv1_weight[0].dim() == input.dim(), op, ": conv weights should be ", input.dim(),
      "-D for a ", input.dim(), "-D input, got layer 1's conv1 of shape ", conv1_weight[0].sizes());
  TORCH_CHECK_VALUE(
      conv1_weight[0].size(1) == input.size(1), op, ": expected an input with ",
      conv1_weight[0].size(1), " channels (what layer 1 reads), got input of shape ", input.sizes());
  const Block block = make_block(
      op,
      {norm1_weight, norm1_bias, norm1_running_mean, norm1_running_var,
       norm1_eps, conv1_weight, norm2_weight, norm2_bias, norm2_running_mean,
       norm2_running_var, norm2_eps, conv2_weight},
      input, input.size(1));
  TORCH_CHECK_VALUE(
      dropout_p >= 0 && dropout_p <= 1, op,
      ": dropout probability has to be between 0 and 1, got ", dropout_p);
  check_batch_rule(op, block, input);
  const SyncBatchNorm sync{sync_group};

  const auto num_layers = block.num_layers();
  const auto format = block_memory_format(input);
  auto output = empty_maps(input, block.out_channels(), format);
  const auto math_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  const BlockStats stats{
      at::zeros({BlockStats::size(block)}, math_options),
      at::zeros({BlockStats::size(block)}, math_options), block.max_in_channels(),
      block.bottleneck_width};
  // Values per channel, over every rank when synchronised: an all-reduce on
  // the device, and only when some norm needs batch statistics.
  const auto values = values_per_channel(input);
  auto count = at::scalar_tensor(values, input.options().dtype(at::kLong));
  if (sync.enabled() && block.any_batch_stats()) {
    count = sync.all_reduce_sum(count);
  }
  // Every layer's norm1 shares the statistics of the channels it reads.
  const BlockStats* shared_stats = block.any_norm1_batch_stats() ? &stats : nullptr;
  store_features(input, output, 0, shared_stats, sync, count);

  auto scratch = at::empty({values * block.scratch_channels()}, input.options());
  std::vector<Tensor> bottlenecks, dropout_masks;
  for (const auto l : c10::irange(num_layers)) {
    const auto& layer = block.layers[l];
    const auto channels = block.in_channels(l);
    const auto norm1_out = scratch_view(scratch, maps_shape(input, channels), format);
    apply_bn_relu(
        layer.norm1, norm1_normalization(block, l, stats),
        range_of(output, 1, 0, channels), norm1_out);
    Tensor new_features, bottleneck, conv_input;
    if (block.has_bottleneck()) {
      bottleneck = conv1x1(norm1_out, with_dtype_of(layer.conv1_weight, input));
      const auto norm2 = norm2_normalization(block, l, stats);
      if (layer.norm2.uses_batch_stats()) {
        ops::channel_stats_out(bottleneck, norm2.mean, norm2.var);
        if (sync.enabled()) {
          sync.merge(norm2.mean, norm2.var, values, count);
        }
      }
      // norm1's output is spent: norm2's takes the scratch.
      const auto norm2_out = scratch_view(scratch, bottleneck.sizes(), format);
      apply_bn_relu(layer.norm2, norm2, bottleneck, norm2_out);
      conv_input = norm2_out;
    } else {
      conv_input = norm1_out;
    }
    const auto conv_weight = with_dtype_of(block.has_bottleneck() ? layer.conv2_weight : layer.conv1_weight, input);
    new_features = conv3x3(conv_input, conv_weight);
    if (dropout_p > 0) {
      // Drawn on the convolution's output laid out as a naive layer's
      // (F.dropout draws in memory order: a copy only where our layout
      // differs; whole channels' noise [N, k, 1, …] has no layout); kept in
      // the block's format, as the fake says.
      const auto drawn_on = dropout_whole_channels
          ? new_features
          : new_features.contiguous(aten_output_format(conv_input, conv_weight, 1));
      auto [dropped, mask] = dropout_with_mask(drawn_on, dropout_p, dropout_whole_channels);
      new_features = std::move(dropped);
      if (save_for_backward) {
        dropout_masks.push_back(mask.contiguous(format));
      }
    }
    // The last layer's channels feed no norm: they need no statistics.
    store_features(
        new_features, output, channels, l + 1 < num_layers ? shared_stats : nullptr, sync, count);
    if (save_for_backward && !recompute_bottleneck && bottleneck.defined()) {
      bottlenecks.push_back(std::move(bottleneck));
    }
  }
  return {output, bottlenecks, stats.mean, stats.var, count, dropout_masks};
}

} // namespace

TORCH_LIBRARY_IMPL(densenet_efficient, CompositeExplicitAutograd, m) {
  m.impl("dense_block_forward", &dense_block_forward);
}

} // namespace densenet_efficient::block
