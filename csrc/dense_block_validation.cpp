// Argument checks of the dense block operators: every per-layer tensor's
// shape, dtype and device, before anything is computed or written.
#include "dense_block.h"
#include "per_channel_ops.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <array>
#include <string>
#include <utility>
#include <vector>

namespace densenet_efficient::block {
namespace {

// Parameters have the input's dtype or its math type (float32 next to
// half/bfloat16 input: mixed precision). BatchNorm computes in the math type
// as nn.BatchNorm2d does under autocast; a float32 conv weight is cast to the
// input's dtype one layer at a time (with_dtype_of), as autocast would cast it
// for the convolution, and its gradient comes back in float32.
void check_parameter(
    const char* op,
    int64_t layer,
    const char* name,
    const Tensor& t,
    at::IntArrayRef expected_shape,
    const Tensor& input) {
  TORCH_CHECK_VALUE(
      t.sizes() == expected_shape, op, ": layer ", layer + 1, " ", name,
      " should have shape ", expected_shape, ", got ", t.sizes());
  TORCH_CHECK_TYPE(
      is_parameter_dtype(t.scalar_type(), input), op, ": layer ", layer + 1, " ", name, " has dtype ",
      t.scalar_type(), " but the input has dtype ", input.scalar_type(), "; expected ", parameter_dtypes(input));
  TORCH_CHECK(
      t.device() == input.device(), op, ": layer ", layer + 1, " ", name,
      " is on ", t.device(), " but the input is on ", input.device(),
      "; expected all tensors on the same device");
}

Norm make_norm(
    const char* op,
    int64_t layer,
    const char* name,
    const Tensor& weight,
    const Tensor& bias,
    const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var,
    double eps,
    int64_t channels,
    const Tensor& input) {
  const std::string prefix = std::string(name) + ".";
  check_parameter(
      op, layer, (prefix + "weight").c_str(), weight, {channels}, input);
  check_parameter(
      op, layer, (prefix + "bias").c_str(), bias, {channels}, input);
  TORCH_CHECK_VALUE(
      running_mean.has_value() == running_var.has_value(), op, ": layer ",
      layer + 1, " ", name,
      ": running_mean and running_var must be given together (running "
      "statistics) or both omitted (batch statistics)");
  for (const auto* stat : {&running_mean, &running_var}) {
    if (stat->has_value()) {
      const Tensor& t = **stat;
      TORCH_CHECK_VALUE(
          t.dim() == 1 && t.size(0) == channels, op, ": layer ", layer + 1,
          " ", name, " running statistics should have shape [", channels,
          "], got ", t.sizes());
      TORCH_CHECK(
          t.device() == input.device(), op, ": layer ", layer + 1, " ", name,
          " running statistics are on ", t.device(), " but the input is on ",
          input.device());
    }
  }
  TORCH_CHECK_VALUE(
      eps > 0, op, ": layer ", layer + 1, " ", name,
      ".eps should be positive, got ", eps);
  return {weight, bias, running_mean, running_var, eps};
}

} // namespace

Block make_block(
    const char* op,
    const BlockArgs& args,
    const Tensor& input,
    int64_t num_input_features) {
  const auto num_layers = static_cast<int64_t>(args.conv1_weight.size());
  TORCH_CHECK_VALUE(num_layers >= 1, op, ": a dense block needs at least one layer");
  const std::array<std::pair<const char*, size_t>, 5> norm1_lengths{{
      {"norm1_weight", args.norm1_weight.size()},
      {"norm1_bias", args.norm1_bias.size()},
      {"norm1_running_mean", args.norm1_running_mean.size()},
      {"norm1_running_var", args.norm1_running_var.size()},
      {"norm1_eps", args.norm1_eps.size()},
  }};
  for (const auto& [name, length] : norm1_lengths) {
    TORCH_CHECK_VALUE(
        static_cast<int64_t>(length) == num_layers, op, ": expected ", name,
        " to have one entry per layer (", num_layers, "), got ", length);
  }
  // Bottleneck layers give every norm2/conv2 list one entry per layer;
  // plain layers give them none.
  const bool bottleneck = !args.conv2_weight.empty();
  const auto expected = bottleneck ? num_layers : 0;
  const std::array<std::pair<const char*, size_t>, 6> norm2_lengths{{
      {"norm2_weight", args.norm2_weight.size()},
      {"norm2_bias", args.norm2_bias.size()},
      {"norm2_running_mean", args.norm2_running_mean.size()},
      {"norm2_running_var", args.norm2_running_var.size()},
      {"norm2_eps", args.norm2_eps.size()},
      {"conv2_weight", args.conv2_weight.size()},
  }};
  for (const auto& [name, length] : norm2_lengths) {
    TORCH_CHECK_VALUE(
        static_cast<int64_t>(length) == expected, op, ": expected ", name,
        " to have ", expected, " entries (", bottleneck ? "one per layer" : "none: plain layers",
        "), got ", length);
  }
  const auto& first_conv1 = args.conv1_weight[0];
  // Convolutions of the input's spatial rank: weights [out, in, *kernel].
  const auto rank = input.dim();
  TORCH_CHECK_VALUE(
      first_conv1.dim() == rank && (!bottleneck || args.conv2_weight[0].dim() == rank), op,
      ": conv weights should be ", rank, "-D (the rank of the block's tensors, ", input.sizes(), ")",
      ", got conv1 ", first_conv1.sizes(),
      bottleneck ? " and conv2 " : "", bottleneck ? args.conv2_weight[0].sizes() : at::IntArrayRef{});
  const auto kernel = [rank](int64_t out, int64_t in, int64_t size) {
    std::vector<int64_t> shape(static_cast<size_t>(rank), size);
    shape[0] = out;
    shape[1] = in;
    return shape;
  };
  Block block{
      {},
      num_input_features,
      bottleneck ? args.conv2_weight[0].size(0) : first_conv1.size(0),
      bottleneck ? first_conv1.size(0) : 0};
  for (const auto l : c10::irange(num_layers)) {
    const auto channels = block.in_channels(l);
    const auto width = block.bottleneck_width;
    Layer layer;
    layer.norm1 = make_norm(
        op, l, "norm1", args.norm1_weight[l], args.norm1_bias[l],
        args.norm1_running_mean.get(l), args.norm1_running_var.get(l),
        args.norm1_eps[l], channels, input);
    layer.conv1_weight = args.conv1_weight[l];
    if (bottleneck) {
      check_parameter(
          op, l, "conv1.weight", layer.conv1_weight, kernel(width, channels, 1), input);
      layer.norm2 = make_norm(
          op, l, "norm2", args.norm2_weight[l], args.norm2_bias[l],
          args.norm2_running_mean.get(l), args.norm2_running_var.get(l),
          args.norm2_eps[l], width, input);
      layer.conv2_weight = args.conv2_weight[l];
      check_parameter(
          op, l, "conv2.weight", layer.conv2_weight, kernel(block.growth_rate, width, 3), input);
    } else {
      check_parameter(
          op, l, "conv1.weight", layer.conv1_weight, kernel(block.growth_rate, channels, 3),
          input);
    }
    block.layers.push_back(std::move(layer));
  }
  return block;
}

void check_block_rank(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_VALUE(
      t.dim() >= 2 + kMinSpatialDims && t.dim() <= 2 + kMaxSpatialDims, op,
      ": expected a 3-D, 4-D or 5-D ", name,
      " ([N, C, L], [N, C, H, W] or [N, C, D, H, W]), got a ", t.dim(), "-D tensor of shape ",
      t.sizes());
}

void check_batch_rule(const char* op, const Block& block, const Tensor& input) {
  TORCH_CHECK_VALUE(
      !block.any_batch_stats() || values_per_channel(input) != 1,
      op, ": Expected more than 1 value per channel when training, got input size ",
      input.sizes());
}

} // namespace densenet_efficient::block
