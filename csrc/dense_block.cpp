// The efficient dense block: the per-layer loops of forward and backward
// (see docs/design.md). Device-agnostic: convolutions come from ATen, the
// per-channel work from the densenet_efficient operators, both through the
// dispatcher, so one implementation serves every device.
//
// Forward writes every layer's k new channels into one block buffer (which is
// the block's output), computes each channel's batch statistics once, and
// keeps per layer only the bottleneck output (or nothing, when it is
// recomputed). Backward walks the layers in reverse, recomputes the BN-ReLU
// outputs into shared scratch buffers and accumulates input gradients in place
// into one gradient buffer.
#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace densenet_efficient {
namespace {

using at::Tensor;
using OptionalTensors = c10::List<std::optional<Tensor>>;

struct Norm {
  Tensor weight;
  Tensor bias;
  std::optional<Tensor> running_mean;  // absent: normalise by batch statistics
  std::optional<Tensor> running_var;
  double eps = 0;

  bool uses_batch_stats() const {
    return !running_mean.has_value();
  }
};

// A DenseNet-B layer (norm1 → conv1 1×1 → norm2 → conv2 3×3), or a plain
// DenseNet layer (norm1 → conv1 3×3; norm2 and conv2 unused).
struct Layer {
  Norm norm1;
  Tensor conv1_weight;
  Norm norm2;
  Tensor conv2_weight;
};

struct Block {
  std::vector<Layer> layers;
  int64_t num_input_features;
  int64_t growth_rate;
  int64_t bottleneck_width;  // 0: plain layers

  bool has_bottleneck() const {
    return bottleneck_width > 0;
  }
  int64_t num_layers() const {
    return static_cast<int64_t>(layers.size());
  }
  // Channels layer l reads: the block input and every earlier layer's output.
  int64_t in_channels(int64_t l) const {
    return num_input_features + l * growth_rate;
  }
  int64_t out_channels() const {
    return in_channels(num_layers());
  }
  // The widest norm1 input, that of the last layer.
  int64_t max_in_channels() const {
    return in_channels(num_layers() - 1);
  }
  bool any_norm1_batch_stats() const {
    for (const auto& layer : layers) {
      if (layer.norm1.uses_batch_stats()) {
        return true;
      }
    }
    return false;
  }
  bool any_batch_stats() const {
    for (const auto& layer : layers) {
      if (layer.norm1.uses_batch_stats() ||
          (has_bottleneck() && layer.norm2.uses_batch_stats())) {
        return true;
      }
    }
    return false;
  }
};

// The parameter lists as the schemas pass them, one entry per layer.
struct BlockArgs {
  at::TensorList norm1_weight;
  at::TensorList norm1_bias;
  const OptionalTensors& norm1_running_mean;
  const OptionalTensors& norm1_running_var;
  at::ArrayRef<double> norm1_eps;
  at::TensorList conv1_weight;
  at::TensorList norm2_weight;
  at::TensorList norm2_bias;
  const OptionalTensors& norm2_running_mean;
  const OptionalTensors& norm2_running_var;
  at::ArrayRef<double> norm2_eps;
  at::TensorList conv2_weight;
};

// Conv weights must have the input's dtype. BatchNorm parameters may also be
// in the input's math type (float32 next to half/bfloat16 input: mixed
// precision, as nn.BatchNorm2d allows under autocast).
enum class ParameterDtype { kInput, kInputOrMath };

void check_parameter(
    const char* op,
    int64_t layer,
    const char* name,
    const Tensor& t,
    at::IntArrayRef expected_shape,
    const Tensor& input,
    ParameterDtype allowed = ParameterDtype::kInput) {
  TORCH_CHECK_VALUE(
      t.sizes() == expected_shape, op, ": layer ", layer + 1, " ", name,
      " should have shape ", expected_shape, ", got ", t.sizes());
  const auto math = at::toOpMathType(input.scalar_type());
  const bool dtype_ok = t.scalar_type() == input.scalar_type() ||
      (allowed == ParameterDtype::kInputOrMath && t.scalar_type() == math);
  TORCH_CHECK_TYPE(
      dtype_ok, op, ": layer ", layer + 1, " ", name, " has dtype ",
      t.scalar_type(), " but the input has dtype ", input.scalar_type(),
      allowed == ParameterDtype::kInput
          ? "; they must share a dtype"
          : "; expected the input's dtype or its math dtype");
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
      op, layer, (prefix + "weight").c_str(), weight, {channels}, input,
      ParameterDtype::kInputOrMath);
  check_parameter(
      op, layer, (prefix + "bias").c_str(), bias, {channels}, input,
      ParameterDtype::kInputOrMath);
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

// Validates every per-layer argument against `input` (the block input, or
// for backward the block output, which has the same dtype and device).
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
  TORCH_CHECK_VALUE(
      first_conv1.dim() == 4 && (!bottleneck || args.conv2_weight[0].dim() == 4),
      op, ": conv weights should be 4-D, got conv1 ", first_conv1.sizes());
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
          op, l, "conv1.weight", layer.conv1_weight, {width, channels, 1, 1},
          input);
      layer.norm2 = make_norm(
          op, l, "norm2", args.norm2_weight[l], args.norm2_bias[l],
          args.norm2_running_mean.get(l), args.norm2_running_var.get(l),
          args.norm2_eps[l], width, input);
      layer.conv2_weight = args.conv2_weight[l];
      check_parameter(
          op, l, "conv2.weight", layer.conv2_weight,
          {block.growth_rate, width, 3, 3}, input);
    } else {
      check_parameter(
          op, l, "conv1.weight", layer.conv1_weight,
          {block.growth_rate, channels, 3, 3}, input);
    }
    block.layers.push_back(std::move(layer));
  }
  return block;
}

void check_batch_rule(const char* op, const Block& block, const Tensor& input) {
  // PyTorch's rule for batch statistics (torch.nn.functional.batch_norm).
  TORCH_CHECK_VALUE(
      !block.any_batch_stats() ||
          input.size(0) * input.size(2) * input.size(3) != 1,
      op, ": Expected more than 1 value per channel when training, got input size ",
      input.sizes());
}

// Per-channel statistics of the whole forward pass. Shapes are fixed by the
// block (channel_*: [C_max], bottleneck_*: [L, 4k]); entries for norms that
// use running statistics stay zero.
struct BlockStats {
  Tensor channel_mean;
  Tensor channel_var;
  Tensor bottleneck_mean;
  Tensor bottleneck_var;
};

struct Normalization {
  Tensor mean;
  Tensor invstd;
};

Normalization normalization(
    const Norm& norm,
    const Tensor& batch_mean,
    const Tensor& batch_var) {
  if (norm.uses_batch_stats()) {
    return {batch_mean, at::rsqrt(batch_var + norm.eps)};
  }
  return {*norm.running_mean, at::rsqrt(*norm.running_var + norm.eps)};
}

Normalization norm1_normalization(
    const Block& block,
    int64_t l,
    const BlockStats& stats) {
  const auto channels = block.in_channels(l);
  return normalization(
      block.layers[l].norm1, stats.channel_mean.narrow(0, 0, channels),
      stats.channel_var.narrow(0, 0, channels));
}

Normalization norm2_normalization(
    const Block& block,
    int64_t l,
    const BlockStats& stats) {
  return normalization(
      block.layers[l].norm2, stats.bottleneck_mean[l], stats.bottleneck_var[l]);
}

void apply_bn_relu(
    const Norm& norm,
    const Normalization& n,
    const Tensor& input,
    const Tensor& out) {
  ops::bn_relu_out(input, n.mean, n.invstd, norm.weight, norm.bias, out);
}

// The first `sizes` elements of a flat scratch buffer, as a contiguous tensor.
Tensor scratch_view(const Tensor& scratch, at::IntArrayRef sizes) {
  return scratch.narrow(0, 0, c10::multiply_integers(sizes)).view(sizes);
}

Tensor conv1x1(const Tensor& input, const Tensor& weight) {
  return at::conv2d(input, weight);
}

Tensor conv3x3(const Tensor& input, const Tensor& weight) {
  return at::conv2d(input, weight, {}, /*stride=*/1, /*padding=*/1);
}

// Gradients of a bias-free, stride-1 conv2d w.r.t. its input and weight.
std::tuple<Tensor, Tensor> conv_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight,
    int64_t padding) {
  auto [grad_input, grad_weight, unused_grad_bias] = at::convolution_backward(
      grad_output, input, weight, /*bias_sizes=*/std::nullopt,
      /*stride=*/{1, 1}, /*padding=*/{padding, padding}, /*dilation=*/{1, 1},
      /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1,
      /*output_mask=*/{true, true, false});
  return {grad_input, grad_weight};
}

// at::native_dropout draws its mask exactly as at::dropout (F.dropout) does on
// every device, so seeded runs match the reference; it also hands back the
// mask that backward needs. p == 1 draws nothing, as at::dropout.
std::tuple<Tensor, Tensor> dropout_with_mask(const Tensor& input, double p) {
  if (p == 1) {
    return {at::zeros_like(input), at::zeros_like(input, at::kBool)};
  }
  return at::native_dropout(input, p, /*train=*/true);
}

Tensor dropout_backward(const Tensor& grad, const Tensor& mask, double p) {
  return at::native_dropout_backward(grad, mask, p == 1 ? 0.0 : 1.0 / (1.0 - p));
}

// Synchronised BatchNorm across the ranks of a process group (sync_group is
// its name, "" for none; sync_count the number of values per channel over all
// ranks). The collectives are PyTorch's functional ones, through the
// dispatcher.
struct SyncBatchNorm {
  c10::string_view group;
  int64_t count = 0;

  bool enabled() const {
    return !group.empty();
  }

  // Boxed calls: the argument types of these schemas differ between PyTorch
  // versions (the group name is `str` in some, `Any` in others).
  static Tensor call(const char* name, std::vector<c10::IValue> stack) {
    c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxed(&stack);
    return stack.at(0).toTensor();
  }

  Tensor all_reduce_sum(const Tensor& t) const {
    auto reduced = call(
        "_c10d_functional::all_reduce",
        {t.contiguous(), std::string("sum"), std::string(group)});
    return call("_c10d_functional::wait_tensor", {reduced});
  }

  // Chan's merge of every rank's (count, mean, biased variance) with two
  // all-reduces: the global mean from Σ n·mean, then the global M2 from
  // Σ (n·var + n·(mean − global mean)²).
  std::pair<Tensor, Tensor> merge(
      const Tensor& mean,
      const Tensor& var,
      int64_t local_count) const {
    const double n = static_cast<double>(local_count);
    // An empty local batch has NaN statistics; it contributes nothing.
    const auto local_mean = local_count > 0 ? mean : at::zeros_like(mean);
    const auto local_var = local_count > 0 ? var : at::zeros_like(var);
    const double total = static_cast<double>(count);
    const auto global_mean = all_reduce_sum(local_mean * n) / total;
    const auto m2 = all_reduce_sum(
        (local_var + (local_mean - global_mean).square()) * n);
    return {global_mean, m2 / total};
  }
};

// Batch statistics of channels [start, start + length) of `features`, merged
// across ranks when synchronised, into the block's statistics.
void record_channel_stats(
    const Tensor& features,
    int64_t start,
    int64_t length,
    const SyncBatchNorm& sync,
    Tensor& mean_out,
    Tensor& var_out) {
  auto slice = features.narrow(1, start, length);
  auto [mean, var] = ops::channel_stats(slice);
  if (sync.enabled()) {
    std::tie(mean, var) = sync.merge(
        mean, var, slice.size(0) * slice.size(2) * slice.size(3));
  }
  mean_out.narrow(0, start, length).copy_(mean);
  var_out.narrow(0, start, length).copy_(var);
}

// BN-ReLU backward with statistics of the global batch: the fixed-statistics
// kernel gives dx₀ = γ·r·g and the local sums dγ = r·Σg(x − μ), dβ = Σg;
// with their all-reduced values,
//   dx = dx₀ − γ·r·dβ/M − γ·r²·dγ/M · (x − μ)     (M: global count)
// (PyTorch's SyncBatchNorm does the same). Parameter gradients stay local:
// DistributedDataParallel averages them.
std::tuple<Tensor, Tensor, Tensor> synced_bn_relu_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& mean,
    const Tensor& invstd,
    const Tensor& weight,
    const Tensor& bias,
    const SyncBatchNorm& sync) {
  auto [grad_input, grad_weight, grad_bias] = ops::bn_relu_backward(
      grad_output, input, mean, invstd, weight, bias, /*batch_stats=*/false);
  const auto math = mean.scalar_type();
  const auto sums = sync.all_reduce_sum(
      at::stack({grad_weight.to(math), grad_bias.to(math)}));
  const auto scale = weight.to(math) * invstd / static_cast<double>(sync.count);
  const auto as_channels = [](const Tensor& v) { return v.view({1, -1, 1, 1}); };
  const auto correction = as_channels(scale * sums[1]) +
      as_channels(scale * invstd * sums[0]) *
          (input.to(math) - as_channels(mean));
  return {
      (grad_input.to(math) - correction).to(input.scalar_type()),
      grad_weight,
      grad_bias};
}

using ForwardResult = std::tuple<
    Tensor,
    std::vector<Tensor>,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    std::vector<Tensor>>;

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
    bool recompute_bottleneck,
    bool save_for_backward,
    c10::string_view sync_group,
    int64_t sync_count) {
  constexpr const char* op = "dense_block_forward";
  TORCH_CHECK_VALUE(
      input.dim() == 4, op, ": expected a 4-D input [N, C, H, W], got a ",
      input.dim(), "-D tensor of shape ", input.sizes());
  TORCH_CHECK_TYPE(
      at::isFloatingType(input.scalar_type()), op,
      ": expected a floating-point input, got ", input.scalar_type());
  TORCH_CHECK_VALUE(
      !conv1_weight.empty(), op, ": a dense block needs at least one layer");
  TORCH_CHECK_VALUE(
      conv1_weight[0].dim() == 4 && conv1_weight[0].size(1) == input.size(1),
      op, ": expected an input with ", conv1_weight[0].sizes().at(1),
      " channels (what layer 1 reads), got input of shape ", input.sizes());
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
  const SyncBatchNorm sync{sync_group, sync_count};
  TORCH_CHECK_VALUE(
      !sync.enabled() || sync_count > 1, op,
      ": sync_count (values per channel over all ranks) must exceed 1, got ",
      sync_count);

  const auto batch = input.size(0), height = input.size(2), width = input.size(3);
  const auto num_layers = block.num_layers();
  const auto growth = block.growth_rate;
  auto output = at::empty(
      {batch, block.out_channels(), height, width}, input.options(),
      at::MemoryFormat::Contiguous);
  output.narrow(1, 0, block.num_input_features).copy_(input);

  const auto math_options =
      input.options().dtype(at::toOpMathType(input.scalar_type()));
  BlockStats stats{
      at::zeros({block.max_in_channels()}, math_options),
      at::zeros({block.max_in_channels()}, math_options),
      at::zeros({num_layers, block.bottleneck_width}, math_options),
      at::zeros({num_layers, block.bottleneck_width}, math_options)};
  const bool shared_stats = block.any_norm1_batch_stats();
  if (shared_stats) {
    record_channel_stats(
        output, 0, block.num_input_features, sync, stats.channel_mean,
        stats.channel_var);
  }

  auto norm1_scratch = at::empty(
      {batch * block.max_in_channels() * height * width}, input.options());
  auto norm2_out = at::empty(
      {batch, block.bottleneck_width, height, width}, input.options());
  std::vector<Tensor> bottlenecks, dropout_masks;
  for (const auto l : c10::irange(num_layers)) {
    const auto& layer = block.layers[l];
    const auto channels = block.in_channels(l);
    auto norm1_out = scratch_view(norm1_scratch, {batch, channels, height, width});
    apply_bn_relu(
        layer.norm1, norm1_normalization(block, l, stats),
        output.narrow(1, 0, channels), norm1_out);
    Tensor new_features, bottleneck;
    if (block.has_bottleneck()) {
      bottleneck = conv1x1(norm1_out, layer.conv1_weight);
      if (layer.norm2.uses_batch_stats()) {
        auto mean_out = stats.bottleneck_mean[l], var_out = stats.bottleneck_var[l];
        record_channel_stats(
            bottleneck, 0, block.bottleneck_width, sync, mean_out, var_out);
      }
      apply_bn_relu(
          layer.norm2, norm2_normalization(block, l, stats), bottleneck,
          norm2_out);
      new_features = conv3x3(norm2_out, layer.conv2_weight);
    } else {
      new_features = conv3x3(norm1_out, layer.conv1_weight);
    }
    if (dropout_p > 0) {
      auto [dropped, mask] = dropout_with_mask(new_features, dropout_p);
      new_features = std::move(dropped);
      if (save_for_backward) {
        dropout_masks.push_back(std::move(mask));
      }
    }
    output.narrow(1, channels, growth).copy_(new_features);
    if (shared_stats && l + 1 < num_layers) {
      record_channel_stats(
          output, channels, growth, sync, stats.channel_mean, stats.channel_var);
    }
    if (save_for_backward && !recompute_bottleneck && bottleneck.defined()) {
      bottlenecks.push_back(std::move(bottleneck));
    }
  }
  return {
      output,
      bottlenecks,
      stats.channel_mean,
      stats.channel_var,
      stats.bottleneck_mean,
      stats.bottleneck_var,
      dropout_masks};
}

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
    const Tensor& channel_mean,
    const Tensor& channel_var,
    const Tensor& bottleneck_mean,
    const Tensor& bottleneck_var,
    at::TensorList dropout_masks,
    double dropout_p,
    c10::string_view sync_group,
    int64_t sync_count) {
  constexpr const char* op = "dense_block_backward";
  TORCH_CHECK_VALUE(
      output.dim() == 4 && !conv1_weight.empty() &&
          conv1_weight[0].dim() == 4,
      op, ": expected a 4-D block output and at least one layer");
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
  const std::vector<int64_t> channel_stats_shape{block.max_in_channels()};
  const std::vector<int64_t> bottleneck_stats_shape{
      num_layers, block.bottleneck_width};
  const bool stats_shapes_ok = channel_mean.sizes() == channel_stats_shape &&
      channel_var.sizes() == channel_stats_shape &&
      bottleneck_mean.sizes() == bottleneck_stats_shape &&
      bottleneck_var.sizes() == bottleneck_stats_shape;
  TORCH_CHECK_VALUE(
      stats_shapes_ok, op, ": expected saved statistics of shapes ",
      channel_stats_shape, " and ", bottleneck_stats_shape, ", got ",
      channel_mean.sizes(), " and ", bottleneck_mean.sizes());

  const auto batch = output.size(0), height = output.size(2), width = output.size(3);
  const auto growth = block.growth_rate;
  const BlockStats stats{channel_mean, channel_var, bottleneck_mean, bottleneck_var};
  const SyncBatchNorm sync{sync_group, sync_count};
  auto grad_features = at::empty(
      output.sizes(), output.options(), at::MemoryFormat::Contiguous);
  grad_features.copy_(grad_output);
  auto norm1_scratch = at::empty(
      {batch * block.max_in_channels() * height * width}, output.options());
  auto norm2_out = at::empty(
      {batch, block.bottleneck_width, height, width}, output.options());

  const auto bottleneck_layers = block.has_bottleneck() ? num_layers : 0;
  std::vector<Tensor> grad_norm1_weight(num_layers), grad_norm1_bias(num_layers),
      grad_conv1_weight(num_layers), grad_norm2_weight(bottleneck_layers),
      grad_norm2_bias(bottleneck_layers), grad_conv2_weight(bottleneck_layers);
  for (int64_t l = num_layers - 1; l >= 0; --l) {
    const auto& layer = block.layers[l];
    const auto channels = block.in_channels(l);
    // Every later layer has already added its share: this slice is complete.
    auto grad_new_features = grad_features.narrow(1, channels, growth);
    if (dropout_p > 0) {
      grad_new_features =
          dropout_backward(grad_new_features, dropout_masks[l], dropout_p);
    }
    const auto features = output.narrow(1, 0, channels);
    const auto norm1 = norm1_normalization(block, l, stats);
    auto norm1_out = scratch_view(norm1_scratch, {batch, channels, height, width});
    apply_bn_relu(layer.norm1, norm1, features, norm1_out);

    Tensor grad_norm1_out;
    if (block.has_bottleneck()) {
      const auto bottleneck = bottlenecks.empty()
          ? conv1x1(norm1_out, layer.conv1_weight)
          : bottlenecks[l];
      const auto norm2 = norm2_normalization(block, l, stats);
      apply_bn_relu(layer.norm2, norm2, bottleneck, norm2_out);
      auto [grad_norm2_out, grad_conv2] =
          conv_backward(grad_new_features, norm2_out, layer.conv2_weight, 1);
      auto [grad_bottleneck, grad_weight2, grad_bias2] =
          sync.enabled() && layer.norm2.uses_batch_stats()
          ? synced_bn_relu_backward(
                grad_norm2_out, bottleneck, norm2.mean, norm2.invstd,
                layer.norm2.weight, layer.norm2.bias, sync)
          : ops::bn_relu_backward(
                grad_norm2_out, bottleneck, norm2.mean, norm2.invstd,
                layer.norm2.weight, layer.norm2.bias,
                layer.norm2.uses_batch_stats());
      std::tie(grad_norm1_out, grad_conv1_weight[l]) =
          conv_backward(grad_bottleneck, norm1_out, layer.conv1_weight, 0);
      grad_norm2_weight[l] = std::move(grad_weight2);
      grad_norm2_bias[l] = std::move(grad_bias2);
      grad_conv2_weight[l] = std::move(grad_conv2);
    } else {
      std::tie(grad_norm1_out, grad_conv1_weight[l]) =
          conv_backward(grad_new_features, norm1_out, layer.conv1_weight, 1);
    }
    auto grad_features_in = grad_features.narrow(1, 0, channels);
    if (sync.enabled() && layer.norm1.uses_batch_stats()) {
      Tensor grad_in;
      std::tie(grad_in, grad_norm1_weight[l], grad_norm1_bias[l]) =
          synced_bn_relu_backward(
              grad_norm1_out, features, norm1.mean, norm1.invstd,
              layer.norm1.weight, layer.norm1.bias, sync);
      grad_features_in.add_(grad_in);
    } else {
      std::tie(grad_norm1_weight[l], grad_norm1_bias[l]) =
          ops::bn_relu_backward_accumulate(
              grad_norm1_out, features, norm1.mean, norm1.invstd,
              layer.norm1.weight, layer.norm1.bias,
              layer.norm1.uses_batch_stats(), grad_features_in);
    }
  }
  auto grad_input = grad_features.narrow(1, 0, block.num_input_features)
                        .contiguous();
  return {
      grad_input,
      grad_norm1_weight,
      grad_norm1_bias,
      grad_conv1_weight,
      grad_norm2_weight,
      grad_norm2_bias,
      grad_conv2_weight};
}

// nn.BatchNorm2d's running-statistics update for a training step, for many
// norms at once: num_batches_tracked += 1, then with factor = momentum (or
// 1 / num_batches_tracked when momentum is None)
//   running_mean = (1 - factor) * running_mean + factor * batch_mean
//   running_var  = (1 - factor) * running_var
//                  + factor * batch_var * count / (count - 1)   (unbiased)
// An empty batch (count 0) only advances num_batches_tracked, as in ATen.
void update_running_stats(
    at::TensorList running_mean,
    at::TensorList running_var,
    at::TensorList num_batches_tracked,
    at::TensorList batch_mean,
    at::TensorList batch_var,
    const c10::List<std::optional<double>>& momentum,
    int64_t count) {
  constexpr const char* op = "update_running_stats";
  const auto n = running_mean.size();
  TORCH_CHECK_VALUE(
      running_var.size() == n && num_batches_tracked.size() == n &&
          batch_mean.size() == n && batch_var.size() == n &&
          momentum.size() == n,
      op, ": all lists must have one entry per norm (", n, ")");
  TORCH_CHECK_VALUE(
      count >= 0 && count != 1, op,
      ": count (values per channel) must be 0 or at least 2, got ", count);
  for (const auto i : c10::irange(n)) {
    TORCH_CHECK_VALUE(
        running_mean[i].sizes() == batch_mean[i].sizes() &&
            running_var[i].sizes() == batch_var[i].sizes() &&
            running_mean[i].sizes() == running_var[i].sizes(),
        op, ": norm ", i, ": running statistics of shape ",
        running_mean[i].sizes(), " do not match batch statistics of shape ",
        batch_mean[i].sizes());
    TORCH_CHECK_VALUE(
        num_batches_tracked[i].numel() == 1, op, ": norm ", i,
        ": num_batches_tracked should hold one value, got shape ",
        num_batches_tracked[i].sizes());
  }
  if (n == 0) {
    return;
  }
  at::_foreach_add_(num_batches_tracked, 1);
  if (count == 0) {
    return;
  }
  std::vector<at::Scalar> keep, take_mean, take_var;
  std::vector<Tensor> mean_update, var_update;
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  for (const auto i : c10::irange(n)) {
    const std::optional<double> m = momentum.get(i);
    const double factor =
        m.has_value() ? *m : 1.0 / num_batches_tracked[i].item<double>();
    keep.emplace_back(1.0 - factor);
    take_mean.emplace_back(factor);
    take_var.emplace_back(factor * unbias);
    mean_update.push_back(batch_mean[i].to(running_mean[i].scalar_type()));
    var_update.push_back(batch_var[i].to(running_var[i].scalar_type()));
  }
  at::_foreach_mul_(running_mean, keep);
  at::_foreach_add_(running_mean, at::_foreach_mul(mean_update, take_mean));
  at::_foreach_mul_(running_var, keep);
  at::_foreach_add_(running_var, at::_foreach_mul(var_update, take_var));
}

} // namespace

TORCH_LIBRARY_IMPL(densenet_efficient, CompositeExplicitAutograd, m) {
  m.impl("dense_block_forward", &dense_block_forward);
  m.impl("dense_block_backward", &dense_block_backward);
  m.impl("update_running_stats", &update_running_stats);
}

} // namespace densenet_efficient
