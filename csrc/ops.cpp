// Every operator schema of the library, declared once, and the dispatcher
// entry points used by the C++ orchestration. Kernels live in cpu/, cuda/ and
// the dense_block_*.cpp files; fake kernels and autograd are registered from
// Python (densenet_efficient/_ops.py), which reads arguments by their names
// here.
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

// No argument has a default, and none is optional (sync_group "" means not
// synchronised): some PyTorch versions drop default-valued arguments before
// autograd sees them, and compiled graphs drop None ones. Mutating custom ops
// return nothing: functionalization refuses custom outputs that alias inputs.
TORCH_LIBRARY(densenet_efficient, m) {
  m.def("channel_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("channel_stats_out(Tensor input, Tensor(a!) mean, Tensor(b!) var) -> ()");
  m.def(
      "copy_with_stats(Tensor source, Tensor(a!) destination, Tensor(b!) mean, "
      "Tensor(c!) var) -> ()");
  m.def(
      "bn_relu(Tensor input, Tensor mean, Tensor var, Tensor weight, "
      "Tensor bias, float eps) -> Tensor");
  m.def(
      "bn_relu_out(Tensor input, Tensor mean, Tensor var, Tensor weight, "
      "Tensor bias, float eps, Tensor(a!) out) -> ()");
  m.def(
      "bn_relu_backward(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor var, Tensor weight, Tensor bias, float eps, bool batch_stats) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "bn_relu_backward_accumulate(Tensor grad_output, Tensor input, "
      "Tensor mean, Tensor var, Tensor weight, Tensor bias, float eps, "
      "bool batch_stats, Tensor(a!) grad_input_sum) "
      "-> (Tensor grad_weight, Tensor grad_bias)");
  // The two passes of bn_relu_backward with batch statistics apart, for
  // synchronised BatchNorm, which all-reduces dγ and dβ between them. The sums
  // come back in the math type (float for half/bfloat16); count (int64, one
  // element) is the global batch's values per channel, read on the device.
  m.def(
      "bn_relu_backward_sums(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor var, Tensor weight, Tensor bias, float eps) "
      "-> (Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "bn_relu_backward_input(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor var, Tensor weight, Tensor bias, float eps, Tensor grad_weight, "
      "Tensor grad_bias, Tensor count, bool accumulate, Tensor(a!) grad_input) -> ()");
  // Norm i takes its batch statistics from batch_mean/batch_var[offsets[i] :
  // offsets[i] + C_i]; count (int64, one element) is the number of values per
  // channel, read on the device (no host synchronisation).
  m.def(
      "update_running_stats(Tensor(a!)[] running_mean, "
      "Tensor(b!)[] running_var, Tensor(c!)[] num_batches_tracked, "
      "float?[] momentum, int[] offsets, Tensor batch_mean, Tensor batch_var, "
      "Tensor count) -> ()");
  // batch_mean/batch_var: [C_max + L·4k], the statistics of the channels
  // norm1 reads, then each layer's bottleneck (zero where a norm uses running
  // statistics); count: values per channel over all ranks (int64).
  // dropout_whole_channels: drop (sample, channel) planes as F.dropout2d/3d
  // do (dropout_masks then hold the scaled noise [N, k, 1, ...]); else single
  // values as F.dropout (bool masks of the new features' shape).
  m.def(
      "dense_block_forward(Tensor input, "
      "Tensor[] norm1_weight, Tensor[] norm1_bias, "
      "Tensor?[] norm1_running_mean, Tensor?[] norm1_running_var, "
      "float[] norm1_eps, Tensor[] conv1_weight, "
      "Tensor[] norm2_weight, Tensor[] norm2_bias, "
      "Tensor?[] norm2_running_mean, Tensor?[] norm2_running_var, "
      "float[] norm2_eps, Tensor[] conv2_weight, "
      "float dropout_p, bool dropout_whole_channels, bool recompute_bottleneck, "
      "bool save_for_backward, "
      "str sync_group) "
      "-> (Tensor output, Tensor[] bottlenecks, Tensor batch_mean, "
      "Tensor batch_var, Tensor count, Tensor[] dropout_masks)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "dense_block_backward(Tensor grad_output, Tensor output, "
      "Tensor[] norm1_weight, Tensor[] norm1_bias, "
      "Tensor?[] norm1_running_mean, Tensor?[] norm1_running_var, "
      "float[] norm1_eps, Tensor[] conv1_weight, "
      "Tensor[] norm2_weight, Tensor[] norm2_bias, "
      "Tensor?[] norm2_running_mean, Tensor?[] norm2_running_var, "
      "float[] norm2_eps, Tensor[] conv2_weight, "
      "Tensor[] bottlenecks, Tensor batch_mean, Tensor batch_var, "
      "Tensor count, Tensor[] dropout_masks, float dropout_p, "
      "bool dropout_whole_channels, "
      "str sync_group) "
      "-> (Tensor grad_input, Tensor[] grad_norm1_weight, "
      "Tensor[] grad_norm1_bias, Tensor[] grad_conv1_weight, "
      "Tensor[] grad_norm2_weight, Tensor[] grad_norm2_bias, "
      "Tensor[] grad_conv2_weight)");
  // The stretches outside the blocks (csrc/norm_relu_pool.cpp): a transition
  // (BN-ReLU-Conv1x1-AvgPool2) and the stem (Conv-BN-ReLU-MaxPool). running_stats:
  // [] for batch statistics, else [running_mean, running_var]; batch_mean/var
  // come back empty then.
  m.def(
      "transition_forward(Tensor input, Tensor weight, Tensor bias, "
      "Tensor[] running_stats, float eps, Tensor conv_weight) "
      "-> (Tensor output, Tensor batch_mean, Tensor batch_var, Tensor count)");
  m.def(
      "transition_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor bias, Tensor[] running_stats, float eps, Tensor conv_weight, "
      "Tensor batch_mean, Tensor batch_var) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, "
      "Tensor grad_conv_weight)");
  // image_grad: whether backward computes the image's gradient (autograd
  // passes whether it is needed; grad_input is empty when not).
  m.def(
      "stem_forward(Tensor input, Tensor conv_weight, int[] conv_stride, "
      "int[] conv_padding, Tensor weight, Tensor bias, Tensor[] running_stats, "
      "float eps, int[] kernel_size, int[] stride, int[] padding) "
      "-> (Tensor output, Tensor batch_mean, Tensor batch_var, Tensor count)");
  m.def(
      "stem_backward(Tensor grad_output, Tensor input, Tensor conv_weight, "
      "int[] conv_stride, int[] conv_padding, Tensor weight, Tensor bias, "
      "Tensor[] running_stats, float eps, int[] kernel_size, int[] stride, "
      "int[] padding, Tensor batch_mean, Tensor batch_var, bool image_grad) "
      "-> (Tensor grad_input, Tensor grad_conv_weight, Tensor grad_weight, "
      "Tensor grad_bias)");
}

namespace densenet_efficient::ops {
namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}
} // namespace

void channel_stats_out(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var) {
  static auto op = find_op<decltype(channel_stats_out)>("densenet_efficient::channel_stats_out");
  op.call(input, mean, var);
}

void copy_with_stats(
    const at::Tensor& source,
    const at::Tensor& destination,
    const at::Tensor& mean,
    const at::Tensor& var) {
  static auto op = find_op<decltype(copy_with_stats)>("densenet_efficient::copy_with_stats");
  op.call(source, destination, mean, var);
}

void bn_relu_out(
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps,
    const at::Tensor& out) {
  static auto op = find_op<decltype(bn_relu_out)>("densenet_efficient::bn_relu_out");
  op.call(input, mean, var, weight, bias, eps, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps,
    bool batch_stats) {
  static auto op = find_op<decltype(bn_relu_backward)>("densenet_efficient::bn_relu_backward");
  return op.call(grad_output, input, mean, var, weight, bias, eps, batch_stats);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_accumulate(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps,
    bool batch_stats,
    const at::Tensor& grad_input_sum) {
  static auto op = find_op<decltype(bn_relu_backward_accumulate)>(
      "densenet_efficient::bn_relu_backward_accumulate");
  return op.call(grad_output, input, mean, var, weight, bias, eps, batch_stats, grad_input_sum);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_sums(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps) {
  static auto op = find_op<decltype(bn_relu_backward_sums)>("densenet_efficient::bn_relu_backward_sums");
  return op.call(grad_output, input, mean, var, weight, bias, eps);
}

void bn_relu_backward_input(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& var,
    const at::Tensor& weight,
    const at::Tensor& bias,
    double eps,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias,
    const at::Tensor& count,
    bool accumulate,
    const at::Tensor& grad_input) {
  static auto op = find_op<decltype(bn_relu_backward_input)>("densenet_efficient::bn_relu_backward_input");
  op.call(grad_output, input, mean, var, weight, bias, eps, grad_weight, grad_bias, count, accumulate, grad_input);
}

} // namespace densenet_efficient::ops
