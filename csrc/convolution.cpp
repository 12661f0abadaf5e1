#include "convolution.h"

#include "cpu/shifted_taps.h"
#include "cpu/tap_columns.h"
#include "dense_block.h"
#include "per_channel_ops.h"

#include <ATen/ATen.h>
#include <ATen/native/ConvUtils.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <vector>

namespace densenet_efficient::block {

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
// to win (see convolution.h). On CUDA cuDNN keeps it: its 1×1 convolutions
// follow torch.backends.cudnn.allow_tf32 (on by default) as the user's other
// convolutions do, while cuBLAS GEMMs follow the matmul precision (full fp32
// by default), and no GPU measurement says the GEMMs win there.
bool runs_as_gemm(const Tensor& t) {
  return t.device().is_cpu();
}

// Whether a stride-1 convolution with this weight and padding keeps the
// maps' size ("same" padding): every spatial size of the weight 2·padding + 1.
bool keeps_size(const Tensor& weight, int64_t padding) {
  for (int64_t d = 2; d < weight.dim(); ++d) {
    if (weight.size(d) != 2 * padding + 1) {
      return false;
    }
  }
  return true;
}

// Whether the product of one-pixel maps' channel rows [N, C] with the weight
// is the convolution: a 1×1 one, and a k×k (k×k×k) one with "same" padding,
// whose centre tap alone meets the pixel. oneDNN took 0.1 ms forward and
// 0.4 ms backward for a 3×3×3 layer of MONAI's DenseNet121 at 1³, the GEMMs
// a few µs; and contiguous maps skip narrow_planes' copies. On the CPU, as
// runs_as_gemm.
bool runs_as_pixel_gemm(const Tensor& input, const Tensor& weight, int64_t padding) {
  return runs_as_gemm(input) && plane_size(input) == 1 && keeps_size(weight, padding);
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

// Whether a k×k (k×k×k) convolution with "same" padding over small maps runs
// as GEMMs over its tap columns (cpu/tap_columns.h): out = columns · Wᵀ,
// dW = dyᵀ · columns, dx gathered from dy · W. oneDNN spends 0.12 ms forward
// and 0.3 ms backward on a 3×3×3 layer of MONAI's DenseNet121 at 2³ (batch
// 2), whose GEMMs take 20–30 µs each: its fixed costs outweigh the batch's
// few pixels. That block's forward and backward went from 28 to 19 ms (29 to
// 15 channels last), densenet121's last (4×4, batch 8) from 25.5 to 23.6 ms;
// MONAI's 4³ block went from 17 to 22 ms, hence kMaxTapPixels. One-pixel
// maps take runs_as_pixel_gemm. On the CPU, as runs_as_gemm.
constexpr int64_t kMaxTapPixels = 16;

bool runs_as_tap_gemm(const Tensor& input, const Tensor& weight, int64_t padding) {
  const auto pixels = plane_size(input);
  return runs_as_gemm(input) && padding >= 1 && pixels >= 2 && pixels <= kMaxTapPixels &&
      keeps_size(weight, padding);
}

cpu::TapOrder tap_order(const Tensor& weight) {
  return weight.suggest_memory_format() == at::MemoryFormat::Contiguous ? cpu::TapOrder::channel_major
                                                                          : cpu::TapOrder::tap_major;
}

// The weight as the [C_out, C_in·T] matrix of `order` (a view of a weight
// laid out in that order).
Tensor tap_weight_matrix(const Tensor& weight, cpu::TapOrder order) {
  // Explicit sizes: -1 cannot be inferred for a weight without elements.
  const auto columns = weight.numel() / std::max<int64_t>(weight.size(0), 1);
  if (order == cpu::TapOrder::channel_major) {
    return contiguous_operand(weight).reshape({weight.size(0), columns});
  }
  return weight.movedim(1, -1).reshape({weight.size(0), columns});
}

// [N, C, *spatial] maps as the [N·plane, C] matrix of their channel rows
// (a copy, unless channels last). Unlike rows_matrix(in_walk(…)), also of
// an empty batch.
Tensor channel_rows(const Tensor& maps) {
  return maps.movedim(1, -1).reshape({maps.size(0) * plane_size(maps), maps.size(1)});
}

Tensor tap_convolution(const Tensor& input, const Tensor& weight) {
  const auto order = tap_order(weight);
  const auto columns = cpu::tap_columns(input, weight.size(2), order);
  const auto weights = tap_weight_matrix(weight, order);
  const auto format = input.suggest_memory_format();
  auto out = empty_maps(input, weight.size(0), format);
  if (format != at::MemoryFormat::Contiguous) {
    auto out_rows = rows_matrix(out);
    at::mm_out(out_rows, columns, weights.t());
    return out;
  }
  planes(out).copy_(
      at::mm(columns, weights.t()).view({input.size(0), plane_size(input), weight.size(0)}).transpose(1, 2));
  return out;
}

std::tuple<Tensor, Tensor> tap_convolution_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Tensor& weight) {
  const auto order = tap_order(weight);
  const auto grad_rows = channel_rows(grad_output);
  // The columns live only for dW: their gradient is the other transient.
  auto grad_weight = at::mm(grad_rows.t(), cpu::tap_columns(input, weight.size(2), order));
  if (order == cpu::TapOrder::tap_major) {  // [C_out, *taps, C_in] back to the weight's dimension order
    auto tap_sizes = weight.movedim(1, -1).sizes().vec();
    grad_weight = grad_weight.view(tap_sizes).movedim(-1, 1);
  } else {
    grad_weight = grad_weight.view(weight.sizes());
  }
  auto grad_input = empty_maps(input, input.size(1), input.suggest_memory_format());
  cpu::tap_columns_backward(at::mm(grad_rows, tap_weight_matrix(weight, order)), weight.size(2), order, grad_input);
  return {grad_input, laid_out_like(grad_weight, weight)};
}

// Whether the backward of a k×k (k×k×k) "same" convolution over
// channels-last CPU maps runs as GEMMs over shifted taps
// (cpu/shifted_taps.h): where their grids are smaller than two weights, what
// oneDNN's channels-last backward adds (two copies of the weight gradient on
// its way out, a reordered weight for the input gradient). In MONAI's
// DenseNet121 that is the 3×3×3 layers at 4³ (batch 2); at 8³ the grids
// would outweigh those copies.
// Float32 and float64 only: half and bfloat16 GEMMs this small run at less
// than half float32's speed (a 4³ layer's 27 taps: 0.70 ms against 0.31),
// slower than oneDNN's whole bfloat16 backward of the layer (0.25 ms).
bool runs_as_shifted_taps(const Tensor& input, const Tensor& weight, int64_t padding) {
  return runs_as_gemm(input) && !c10::isReducedFloatingType(input.scalar_type()) && input.dim() >= 4 &&
      input.numel() > 0 && padding >= 1 && input.suggest_memory_format() != at::MemoryFormat::Contiguous &&
      keeps_size(weight, padding) &&
      cpu::shifted_tap_grid_elements(input, weight.size(0), weight.size(2)) < 2 * weight.numel();
}

// dW = Σ_n dy[n] · x[n]ᵀ: the per-sample products [N, C_out, C_in] summed,
// which copies no operand, unless those products outweigh copying both
// operands into [C, N·plane] matrices for one GEMM (small planes), or the
// dtype is half/bfloat16 (one GEMM rounds once).
Tensor conv1x1_weight_grad(const Tensor& grad_output, const Tensor& input, const Tensor& weight) {
  const auto out_channels = weight.size(0);
  const auto in_channels = weight.size(1);
  Tensor grad;
  if (!c10::isReducedFloatingType(input.scalar_type()) &&
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

at::MemoryFormat aten_output_format(const Tensor& input, const Tensor& weight, int64_t padding) {
  const auto ones = per_spatial_dim(input, 1);
  const auto pads = per_spatial_dim(input, padding);
  const auto zeros = per_spatial_dim(input, 0);
  const auto backend = at::native::select_conv_backend(
      input, weight, /*bias_opt=*/std::nullopt, c10::fromIntArrayRefSlow(ones), c10::fromIntArrayRefSlow(pads),
      c10::fromIntArrayRefSlow(ones), /*transposed=*/false, c10::fromIntArrayRefSlow(zeros), /*groups=*/1,
      /*bias_sizes_opt=*/std::nullopt);
  return at::native::_determine_backend_memory_format(input, weight, backend);
}

Tensor conv3x3(const Tensor& input, const Tensor& weight) {
  if (runs_as_pixel_gemm(input, weight, 1)) {
    return pixel_convolution(input, weight);
  }
  if (runs_as_tap_gemm(input, weight, 1)) {
    return tap_convolution(input, weight);
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
  if (runs_as_tap_gemm(input, weight, padding)) {
    return tap_convolution_backward(grad_output, input, weight);
  }
  if (runs_as_shifted_taps(input, weight, padding)) {
    auto [grad_input, grad_weight] = cpu::shifted_tap_backward(grad_output, input, weight);
    return {grad_input, laid_out_like(grad_weight, weight)};
  }
  const auto conv_weight = conv_weight_for(weight, input);
  auto backward = [&](const Tensor& grad, bool of_input, bool of_weight) {
    return at::convolution_backward(
        grad, input, conv_weight, /*bias_sizes=*/std::nullopt,
        /*stride=*/per_spatial_dim(input, 1), /*padding=*/per_spatial_dim(input, padding),
        /*dilation=*/per_spatial_dim(input, 1), /*transposed=*/false,
        /*output_padding=*/per_spatial_dim(input, 0), /*groups=*/1,
        /*output_mask=*/{of_input, of_weight, false});
  };
  Tensor grad_input, grad_weight;
  if (input.is_cpu()) {
    // oneDNN's weight gradient passes through copies (its buffer to a dense
    // tensor, and that to channels last for channels-last operands): taken
    // first, in a call of its own, they are gone before the input gradient
    // is allocated, at no cost in time. A 3×3×3 layer of MONAI's
    // DenseNet121 at 8³ (batch 2) peaked at 1808 KiB channels last and 1584
    // NCDHW, now 1388 and 1504; densenet121's 3×3 at 32² (batch 8) at 4528
    // and 9512, now 4396 and 8336. The output gradient goes to both calls in
    // the layout ATen's backend takes it, copied once (each call would).
    const auto grad = grad_output.contiguous(aten_output_format(input, conv_weight, padding));
    grad_weight = std::get<1>(backward(grad, false, true));
    grad_input = std::get<0>(backward(grad, true, false));
  } else {
    std::tie(grad_input, grad_weight, std::ignore) = backward(grad_output, true, true);
  }
  // The weight's gradient laid out as the weight, as the fake kernels promise
  // and compiled graphs trust; the input's (used only inside the operators)
  // as ATen gives it.
  return {grad_input, laid_out_like(grad_weight, weight)};
}

} // namespace densenet_efficient::block
