#include "dense_block.h"

#include "ops.h"
#include "per_channel_ops.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/accumulate.h>
#include <c10/util/strides.h>

namespace densenet_efficient::block {

bool Block::any_norm1_batch_stats() const {
  for (const auto& layer : layers) {
    if (layer.norm1.uses_batch_stats()) {
      return true;
    }
  }
  return false;
}

bool Block::any_batch_stats() const {
  for (const auto& layer : layers) {
    if (layer.norm1.uses_batch_stats() ||
        (has_bottleneck() && layer.norm2.uses_batch_stats())) {
      return true;
    }
  }
  return false;
}

Tensor range_of(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  TORCH_INTERNAL_ASSERT(start >= 0 && length >= 0 && start + length <= t.size(dim));
  auto sizes = t.sizes().vec();
  sizes[dim] = length;
  return t.as_strided(sizes, t.strides(), t.storage_offset() + start * t.stride(dim));
}

namespace {
// What `norm` normalises with: its running statistics, or the batch
// statistics at [offset, offset + length) of the block's flat vectors.
Normalization normalization(const Norm& norm, const BlockStats& stats, int64_t offset, int64_t length) {
  if (norm.uses_batch_stats()) {
    return {
        BlockStats::slice(stats.mean, offset, length), BlockStats::slice(stats.var, offset, length),
        norm.eps};
  }
  return {*norm.running_mean, *norm.running_var, norm.eps};
}
} // namespace

Normalization norm1_normalization(const Block& block, int64_t l, const BlockStats& stats) {
  return normalization(block.layers[l].norm1, stats, 0, block.in_channels(l));
}

Normalization norm2_normalization(const Block& block, int64_t l, const BlockStats& stats) {
  return normalization(
      block.layers[l].norm2, stats, stats.bottleneck_offset(l), block.bottleneck_width);
}

void apply_bn_relu(const Norm& norm, const Normalization& n, const Tensor& input, const Tensor& out) {
  ops::bn_relu_out(input, n.mean, n.var, norm.weight, norm.bias, n.eps, out);
}

Tensor contiguous_operand(const Tensor& t) {
  if (!t.is_contiguous()) {
    return t.contiguous();
  }
  if (t.suggest_memory_format() == at::MemoryFormat::Contiguous) {
    return t;
  }
  // Contiguous memory whose size-1 dimensions' strides (a 1×1 kernel's, a
  // single channel's) still read as channels_last, which is what cuDNN and
  // oneDNN look at: the same memory with standard strides.
  return t.as_strided(t.sizes(), c10::contiguous_strides(t.sizes()), t.storage_offset());
}

Tensor weight_operand(const Tensor& weight, at::MemoryFormat format) {
  return format == at::MemoryFormat::Contiguous ? contiguous_operand(weight) : weight.contiguous(format);
}

bool is_parameter_dtype(at::ScalarType dtype, const Tensor& input) {
  return dtype == input.scalar_type() || dtype == at::toOpMathType(input.scalar_type());
}

std::string parameter_dtypes(const Tensor& input) {
  const auto math = at::toOpMathType(input.scalar_type());
  std::string dtypes = c10::toString(input.scalar_type());
  return math == input.scalar_type() ? dtypes : dtypes + " or " + c10::toString(math);
}

Tensor with_dtype_of(const Tensor& weight, const Tensor& like) {
  return weight.scalar_type() == like.scalar_type() ? weight : weight.to(like.scalar_type());
}

Tensor laid_out_like(const Tensor& grad, const Tensor& weight) {
  TORCH_INTERNAL_ASSERT(grad.sizes() == weight.sizes());
  if (grad.strides() == weight.strides()) {
    return grad;
  }
  bool same_layout = true;
  for (int64_t d = 0; d < grad.dim(); ++d) {
    same_layout = same_layout && (grad.size(d) == 1 || grad.stride(d) == weight.stride(d));
  }
  if (same_layout) {
    return grad.as_strided(weight.sizes(), weight.strides(), grad.storage_offset());
  }
  // empty_like's strides, as the fake kernels' (a non-dense weight's
  // dimension order, densely).
  return at::empty_like(weight, grad.options()).copy_(grad);
}

Tensor weight_gradient(const Tensor& grad, const Tensor& weight) {
  return laid_out_like(with_dtype_of(grad, weight), weight);
}

at::MemoryFormat block_memory_format(const Tensor& input) {
  if ((input.dim() != 4 && input.dim() != 5) || (input.dim() == 5 && !input.is_cpu())) {
    return at::MemoryFormat::Contiguous;
  }
  const auto channels_last = input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return input.suggest_memory_format() == channels_last ? channels_last : at::MemoryFormat::Contiguous;
}

Tensor empty_maps(const Tensor& like, int64_t channels, at::MemoryFormat format) {
  return at::empty(maps_shape(like, channels), like.options().memory_format(format));
}

Tensor scratch_view(const Tensor& scratch, at::IntArrayRef sizes, at::MemoryFormat format) {
  std::vector<int64_t> strides;
  if (format == at::MemoryFormat::ChannelsLast) {
    strides = c10::get_channels_last_strides_2d(sizes);
  } else if (format == at::MemoryFormat::ChannelsLast3d) {
    strides = c10::get_channels_last_strides_3d(sizes);
  } else {
    const auto contiguous = c10::contiguous_strides(sizes);
    strides.assign(contiguous.begin(), contiguous.end());
  }
  TORCH_INTERNAL_ASSERT(c10::multiply_integers(sizes) <= scratch.numel());
  return scratch.as_strided(sizes, strides, scratch.storage_offset());
}

std::vector<int64_t> maps_shape(const Tensor& like, int64_t channels) {
  auto sizes = like.sizes().vec();
  sizes[1] = channels;
  return sizes;
}

int64_t values_per_channel(const Tensor& t) {
  return t.size(0) * plane_size(t);
}

// at::native_dropout draws its mask exactly as at::dropout (F.dropout) does on
// every device, so seeded runs match the reference; it also hands back the
// mask that backward needs. p == 1 draws nothing, as at::dropout.
std::tuple<Tensor, Tensor> dropout_with_mask(const Tensor& input, double p, bool whole_channels) {
  if (whole_channels) {
    // at::feature_dropout's draws: noise [N, C, 1, ...] ~ Bernoulli(1 − p),
    // scaled by 1/(1 − p), nothing drawn for p == 1. The noise is the mask.
    std::vector<int64_t> shape(static_cast<size_t>(input.dim()), 1);
    shape[0] = input.size(0);
    shape[1] = input.size(1);
    const auto noise = p == 1 ? at::zeros(shape, input.options())
                              : at::empty(shape, input.options()).bernoulli_(1 - p).div_(1 - p);
    return {input * noise, noise};
  }
  if (p == 1) {
    return {at::zeros_like(input), at::zeros_like(input, at::kBool)};
  }
  return at::native_dropout(input, p, /*train=*/true);
}

Tensor dropout_backward(const Tensor& grad, const Tensor& mask, double p, bool whole_channels) {
  if (whole_channels) {
    return grad * mask;
  }
  return at::native_dropout_backward(grad, mask, p == 1 ? 0.0 : 1.0 / (1.0 - p));
}

} // namespace densenet_efficient::block
