// The efficient dense block's shared pieces: its layers and norms as the
// operators receive them, the layout of its per-channel statistics, and the
// dropout step of a layer (its convolutions: convolution.h). The operators themselves live in
// dense_block_forward.cpp and dense_block_backward.cpp, their argument checks
// in dense_block_validation.cpp, synchronised BatchNorm in
// dense_block_sync.cpp; see docs/design.md for the data path.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace densenet_efficient::block {

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
  // Channels of the scratch the BN-ReLU outputs take turns in: norm1's,
  // then (once the bottleneck is computed) norm2's.
  int64_t scratch_channels() const {
    return std::max(max_in_channels(), bottleneck_width);
  }
  bool any_norm1_batch_stats() const;
  bool any_batch_stats() const;
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

// Validates every per-layer argument against `input` (the block input, or
// for backward the block output, which has the same dtype and device).
Block make_block(
    const char* op,
    const BlockArgs& args,
    const Tensor& input,
    int64_t num_input_features);

// The block takes [N, C, *spatial] tensors with 1 to 3 spatial dimensions
// (Conv1d/2d/3d layers): checks `t` (named `name`) is one.
void check_block_rank(const char* op, const char* name, const Tensor& t);

// PyTorch's rule for batch statistics (torch.nn.functional.batch_norm): more
// than one value per channel.
void check_batch_rule(const char* op, const Block& block, const Tensor& input);

// Elements [start, start + length) of `t` along `dim`, as one view: a single
// operator call (slice and narrow make two or three, and these run several
// times per layer).
Tensor range_of(const Tensor& t, int64_t dim, int64_t start, int64_t length);

// The batch statistics of a forward pass, in two flat vectors (mean, biased
// variance) in the math type: first the C_max channels some norm1 reads, then
// each layer's bottleneck (4k channels). Entries of norms that use running
// statistics stay zero. update_running_stats reads them by offset.
struct BlockStats {
  Tensor mean;
  Tensor var;
  int64_t num_channels;      // C_max
  int64_t bottleneck_width;  // 4k

  static int64_t size(const Block& block) {
    return block.max_in_channels() + block.num_layers() * block.bottleneck_width;
  }
  int64_t bottleneck_offset(int64_t l) const {
    return num_channels + l * bottleneck_width;
  }
  static Tensor slice(const Tensor& v, int64_t start, int64_t length) {
    return range_of(v, 0, start, length);
  }
};

// What a norm normalises with: batch or running statistics, and its eps.
struct Normalization {
  Tensor mean;
  Tensor var;
  double eps;
};

// norm1 of layer l: batch statistics of channels [0, C_l), or its running ones.
Normalization norm1_normalization(const Block& block, int64_t l, const BlockStats& stats);
// norm2 of layer l: batch statistics of its bottleneck, or its running ones.
Normalization norm2_normalization(const Block& block, int64_t l, const BlockStats& stats);

// relu(norm(input)) into `out`.
void apply_bn_relu(const Norm& norm, const Normalization& n, const Tensor& input, const Tensor& out);

// The memory format a block computes in, and its output's: its input's,
// channels last (NHWC, NDHWC: the block buffer, scratches and gradient
// buffer, whose channel slices the CPU and CUDA kernels walk in place by
// channel rows) or contiguous (NCHW; always for 1-D blocks, and for volumes
// on CUDA, whose 3-D average pooling has no channels_last_3d kernel: a
// transition would copy its widest map to contiguous in forward and its
// gradient back in backward, a map more than the memory model counts). A
// channels-last model hands its blocks channels-last inputs (the stem
// follows conv0's weight, as ATen's convolution does).
at::MemoryFormat block_memory_format(const Tensor& input);

// New [N, channels, *spatial] maps like `like`, in `format`.
Tensor empty_maps(const Tensor& like, int64_t channels, at::MemoryFormat format);

// The first `sizes` elements of a flat scratch buffer, as a tensor dense in `format`.
Tensor scratch_view(const Tensor& scratch, at::IntArrayRef sizes, at::MemoryFormat format);

// The shape [N, channels, *spatial] of feature maps like `like` (the block's
// input or output) with `channels` channels.
std::vector<int64_t> maps_shape(const Tensor& like, int64_t channels);

// The values each channel of `t` holds over the batch: N times its plane.
int64_t values_per_channel(const Tensor& t);

// A convolution's input or weight as the convolutions here take it: in the
// standard contiguous layout, strides included (a copy only of a
// channels_last tensor; a view of one that is contiguous but whose size-1
// dimensions' strides say channels_last). cuDNN and oneDNN follow a
// channels_last input or weight: outputs and input gradients would come back
// channels_last, each a widest-feature-map copy away from the contiguous
// layout the kernels, the fake kernels and the memory model assume.
Tensor contiguous_operand(const Tensor& t);

// A convolution's weight in the memory format its input computes in: ATen's
// CPU and cuDNN convolutions take both operands in one layout and copy a
// weight in the other on every call (a channels-last model's 3×3 weights,
// seven copies per layer a step). contiguous_operand for a contiguous input;
// a copy only where the layouts differ.
Tensor weight_operand(const Tensor& weight, at::MemoryFormat format);

// Whether a parameter (a norm's affine vectors, a conv weight) may have
// `dtype` beside `input`: the input's dtype, or its math type (float32
// beside half/bfloat16 maps: mixed precision); and those dtypes, for errors.
bool is_parameter_dtype(at::ScalarType dtype, const Tensor& input);
std::string parameter_dtypes(const Tensor& input);

// A conv weight (or its gradient) in `like`'s dtype: itself, or a cast copy
// (a float32 weight beside half/bfloat16 maps, as autocast makes for each
// convolution; its gradient back in float32).
Tensor with_dtype_of(const Tensor& weight, const Tensor& like);

// A weight's gradient with the weight's own strides, as the fake kernels say:
// AccumulateGrad would copy one laid out otherwise into them. A view when
// only size-1 dimensions' strides differ (1×1 kernels).
Tensor laid_out_like(const Tensor& grad, const Tensor& weight);

// A conv weight's gradient as the operators return it: in the weight's own
// dtype (float32 beside half/bfloat16 maps, as autocast's cast hands it back)
// and strides (laid_out_like).
Tensor weight_gradient(const Tensor& grad, const Tensor& weight);

// Dropout as F.dropout draws it (seeded runs match the reference), or with
// `whole_channels` as F.dropout2d/3d draw it (one draw per sample and
// channel), with the mask backward needs.
std::tuple<Tensor, Tensor> dropout_with_mask(const Tensor& input, double p, bool whole_channels);
Tensor dropout_backward(const Tensor& grad, const Tensor& mask, double p, bool whole_channels);

} // namespace densenet_efficient::block
