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

namespace {
// The weight a block's convolution over `input` takes. Maps of one pixel
// are contiguous and channels last at once, so either layout of the weight
// computes the same memory; on the CPU oneDNN then takes the weight as it
// is (a channels-last model's deepest blocks at 1×1 or 1³: every k×k weight
// and its gradient were copied each step).
Tensor conv_weight_for(const Tensor& weight, const Tensor& input) {
  if (input.is_cpu() && plane_size(input) == 1) {
    return weight;
  }
  return weight_operand(weight, input.suggest_memory_format());
}
} // namespace

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

namespace {
// One value per spatial dimension of `input`.
std::vector<int64_t> per_spatial_dim(const Tensor& input, int64_t value) {
  return std::vector<int64_t>(static_cast<size_t>(input.dim() - 2), value);
}

// at::convolution takes every spatial rank; conv1d/2d/3d are thin wrappers
// around it (one more dispatcher call each).
Tensor convolution(const Tensor& input, const Tensor& weight, int64_t padding) {
  return at::convolution(
      input, conv_weight_for(weight, input), /*bias=*/std::nullopt,
      /*stride=*/per_spatial_dim(input, 1),
      /*padding=*/per_spatial_dim(input, padding), /*dilation=*/per_spatial_dim(input, 1),
      /*transposed=*/false, /*output_padding=*/per_spatial_dim(input, 0), /*groups=*/1);
}
} // namespace

namespace {
// Contiguous [N, C, *spatial] maps as [N, C, plane]. These views run a few
// times per layer: each is one operator call (as_strided).
Tensor planes(const Tensor& maps) {
  TORCH_INTERNAL_ASSERT(maps.is_contiguous());
  const auto plane = plane_size(maps);
  return maps.as_strided(
      {maps.size(0), maps.size(1), plane}, {maps.size(1) * plane, plane, 1}, maps.storage_offset());
}

// [N, C, *spatial] maps as one [C, N·plane] matrix (a copy).
Tensor channel_major(const Tensor& maps) {
  return planes(maps).transpose(0, 1).reshape({maps.size(1), -1});
}

// A [C, N·plane] matrix as [N, C, plane] (a view), N and plane those of `maps`.
Tensor from_channel_major(const Tensor& matrix, const Tensor& maps) {
  return matrix.view({matrix.size(0), maps.size(0), plane_size(maps)}).transpose(0, 1);
}

// Whether contiguous maps' planes are too narrow for one GEMM per sample:
// MKL's products [C_out, C_in]·[C_in, plane] with planes of under 16 values
// run at a few GFLOP/s (a MONAI 3-D block's 2³ and 1³ maps: 0.12 ms for
// [128, 640]·[640, 8] twice, against 0.03 ms for [128, 640]·[640, 16] once),
// so the samples' pixels go through one GEMM, their copies into and out of
// channel-major matrices being as small as the planes. One sample is one
// GEMM either way.
bool narrow_planes(const Tensor& maps) {
  return plane_size(maps) < 16 && maps.size(0) > 1;
}

// Channels-last maps [N, C, *spatial] as the matrix [N·plane, C] of their
// channel rows (no copy).
Tensor rows_matrix(const Tensor& maps) {
  return maps.as_strided(
      {maps.size(0) * plane_size(maps), maps.size(1)}, {row_stride(maps), 1}, maps.storage_offset());
}

// A 1×1 weight [C_out, C_in, 1, ...] as the matrix [C_out, C_in].
Tensor weight_matrix(const Tensor& weight) {
  return contiguous_operand(weight).view({weight.size(0), weight.size(1)});
}

// A 1×1 weight [C_out, C_in, 1, ...] as the matrix [C_out, C_in] (or its
// transpose), repeated `batch` times without a copy.
Tensor batched_weight(const Tensor& weight, int64_t batch, bool transposed) {
  if (weight.stride(0) != 1 && weight.stride(1) != 1) {
    // Neither row- nor column-major: the GEMM would copy every repeat.
    return batched_weight(weight.contiguous(), batch, transposed);
  }
  const auto rows = transposed ? 1 : 0;
  const auto cols = 1 - rows;
  return weight.as_strided(
      {batch, weight.size(rows), weight.size(cols)}, {0, weight.stride(rows), weight.stride(cols)},
      weight.storage_offset());
}

// Whether a 1×1 convolution runs as GEMMs: on the CPU, where that is measured
// to win (see dense_block.h). On CUDA cuDNN keeps it: its 1×1 convolutions
// follow torch.backends.cudnn.allow_tf32 (on by default) as the user's other
// convolutions do, while cuBLAS GEMMs follow the matmul precision (full fp32
// by default), and no GPU measurement says the GEMMs win there.
bool runs_as_gemm(const Tensor& t) {
  return t.device().is_cpu();
}

// Whether the product of one-pixel maps' channel rows [N, C] with the weight
// is the convolution: a 1×1 one, and a k×k (k×k×k) one with "same" padding,
// whose centre tap alone meets the pixel. oneDNN took 0.1 ms forward and
// 0.4 ms backward for a 3×3×3 layer of MONAI's DenseNet121 at 1³, the GEMMs
// a few µs; and contiguous maps skip narrow_planes' copies. On the CPU, as
// runs_as_gemm.
bool runs_as_pixel_gemm(const Tensor& input, const Tensor& weight, int64_t padding) {
  if (!runs_as_gemm(input) || plane_size(input) != 1) {
    return false;
  }
  for (int64_t d = 2; d < weight.dim(); ++d) {
    if (weight.size(d) != 2 * padding + 1) {
      return false;
    }
  }
  return true;
}

// A conv weight's centre tap [C_out, C_in] (a view).
Tensor centre_tap(const Tensor& weight) {
  int64_t offset = weight.storage_offset();
  for (int64_t d = 2; d < weight.dim(); ++d) {
    offset += weight.stride(d) * ((weight.size(d) - 1) / 2);
  }
  return weight.as_strided({weight.size(0), weight.size(1)}, {weight.stride(0), weight.stride(1)}, offset);
}

// out = in · W_centreᵀ over one-pixel maps' rows.
Tensor pixel_convolution(const Tensor& input, const Tensor& weight) {
  auto out = empty_maps(input, weight.size(0), input.suggest_memory_format());
  auto out_rows = rows_matrix(out);
  at::mm_out(out_rows, rows_matrix(input), centre_tap(weight).t());
  return out;
}

// dx = dy · W_centre, and dW zero but at its centre tap, dyᵀ · x; dx written
// into `grad_input`, which may be the (spent) input itself.
Tensor pixel_convolution_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight,
    const Tensor& grad_input) {
  const auto grad_output_rows = rows_matrix(in_walk(grad_output, Walk::rows));
  auto grad_weight = at::zeros_like(weight);
  auto grad_tap = centre_tap(grad_weight);
  at::mm_out(grad_tap, grad_output_rows.t(), rows_matrix(input));
  auto grad_input_rows = rows_matrix(grad_input);
  at::mm_out(grad_input_rows, grad_output_rows, centre_tap(weight));
  return laid_out_like(grad_weight, weight);
}

// dW = Σ_n dy[n] · x[n]ᵀ: the per-sample products [N, C_out, C_in] summed,
// which copies no operand, unless those products outweigh copying both
// operands into [C, N·plane] matrices for one GEMM (small planes), or the
// dtype is half/bfloat16 (one GEMM rounds once).
Tensor conv1x1_weight_grad(const Tensor& grad_output, const Tensor& input, const Tensor& weight) {
  const auto out_channels = weight.size(0);
  const auto in_channels = weight.size(1);
  const bool reduced_precision = at::toOpMathType(input.scalar_type()) != input.scalar_type();
  Tensor grad;
  if (!reduced_precision &&
      out_channels * in_channels <= (out_channels + in_channels) * plane_size(input)) {
    grad = at::bmm(planes(grad_output), planes(input).transpose(1, 2)).sum(0);
  } else {
    grad = at::mm(channel_major(grad_output), channel_major(input).t());
  }
  return laid_out_like(grad.view(weight.sizes()), weight);
}
} // namespace

Tensor conv1x1(const Tensor& input, const Tensor& weight) {
  if (!runs_as_gemm(input)) {
    // In the input's memory format, as the fake kernels say of a kept
    // bottleneck (cuDNN computes float64 in NCHW whatever its input).
    return convolution(input, weight, 0).contiguous(input.suggest_memory_format());
  }
  if (!input.is_contiguous() || plane_size(input) == 1) {  // channel rows: one GEMM over every pixel, out = in · Wᵀ
    auto out = empty_maps(input, weight.size(0), input.suggest_memory_format());
    auto out_rows = rows_matrix(out);
    at::mm_out(out_rows, rows_matrix(input), weight_matrix(weight).t());
    return out;
  }
  auto out = at::empty(
      maps_shape(input, weight.size(0)), input.options(), at::MemoryFormat::Contiguous);
  auto out_planes = planes(out);
  if (narrow_planes(input)) {  // W · [C_in, N·plane], laid back out as [N, C_out, plane]
    out_planes.copy_(from_channel_major(at::mm(weight_matrix(weight), channel_major(input)), input));
    return out;
  }
  at::bmm_out(out_planes, batched_weight(weight, input.size(0), false), planes(input));
  return out;
}

std::tuple<Tensor, Tensor> conv1x1_backward_over_input(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight) {
  if (!runs_as_gemm(input)) {
    return conv_backward(grad_output, input, weight, 0);
  }
  if (!input.is_contiguous() || plane_size(input) == 1) {  // channel rows: dW = dyᵀ · x and dx = dy · W, one GEMM each
    const auto grad_output_rows = rows_matrix(in_walk(grad_output, Walk::rows));
    auto input_rows = rows_matrix(input);
    auto grad_weight = laid_out_like(at::mm(grad_output_rows.t(), input_rows).view(weight.sizes()), weight);
    at::mm_out(input_rows, grad_output_rows, weight_matrix(weight));  // the spent input takes dx
    return {input, grad_weight};
  }
  auto grad_weight = conv1x1_weight_grad(grad_output, input, weight);
  if (narrow_planes(input)) {  // the input is spent: it takes dx = Wᵀ·dy over [C, N·plane] matrices
    planes(input).copy_(
        from_channel_major(at::mm(weight_matrix(weight).t(), channel_major(grad_output)), input));
    return {input, grad_weight};
  }
  const auto grad_output_planes = planes(grad_output);
  // The input is spent: its storage takes the input gradient, Wᵀ·dy[n].
  auto grad_input = planes(input);
  at::bmm_out(grad_input, batched_weight(weight, input.size(0), true), grad_output_planes);
  return {input, grad_weight};
}

Tensor conv3x3(const Tensor& input, const Tensor& weight) {
  if (runs_as_pixel_gemm(input, weight, 1)) {
    return pixel_convolution(input, weight);
  }
  return convolution(input, weight, 1);
}

std::tuple<Tensor, Tensor> conv_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight,
    int64_t padding) {
  if (runs_as_pixel_gemm(input, weight, padding)) {
    auto grad_input = empty_maps(input, input.size(1), input.suggest_memory_format());
    auto grad_weight = pixel_convolution_backward(grad_output, input, weight, grad_input);
    return {grad_input, grad_weight};
  }
  auto [grad_input, grad_weight, unused_grad_bias] = at::convolution_backward(
      grad_output, input, conv_weight_for(weight, input), /*bias_sizes=*/std::nullopt,
      /*stride=*/per_spatial_dim(input, 1), /*padding=*/per_spatial_dim(input, padding),
      /*dilation=*/per_spatial_dim(input, 1), /*transposed=*/false,
      /*output_padding=*/per_spatial_dim(input, 0), /*groups=*/1,
      /*output_mask=*/{true, true, false});
  // The weight's gradient laid out as the weight, as the fake kernels promise
  // and compiled graphs trust; the input's (used only inside the operators)
  // as ATen gives it.
  return {grad_input, laid_out_like(grad_weight, weight)};
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
