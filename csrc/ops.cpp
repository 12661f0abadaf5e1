// Every operator schema of the library, declared once, and the dispatcher
// entry points used by the C++ orchestration. Kernels live in cpu/, cuda/ and
// dense_block.cpp; fake kernels and autograd are registered from Python
// (densenet_efficient/_ops.py).
#include "ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/library.h>

// No argument has a default, and none is optional (sync_group "" means not
// synchronised): some PyTorch versions drop default-valued arguments before
// autograd sees them, and compiled graphs drop None ones.
TORCH_LIBRARY(densenet_efficient, m) {
  m.def("channel_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "bn_relu(Tensor input, Tensor mean, Tensor invstd, Tensor weight, "
      "Tensor bias) -> Tensor");
  // Writes into `out` (the block's shared scratch). Mutating custom ops return
  // nothing: functionalization refuses custom outputs that alias inputs.
  m.def(
      "bn_relu_out(Tensor input, Tensor mean, Tensor invstd, Tensor weight, "
      "Tensor bias, Tensor(a!) out) -> ()");
  m.def(
      "bn_relu_backward(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor invstd, Tensor weight, Tensor bias, bool batch_stats) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "bn_relu_backward_accumulate(Tensor grad_output, Tensor input, "
      "Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
      "bool batch_stats, Tensor(a!) grad_input_sum) "
      "-> (Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "update_running_stats(Tensor(a!)[] running_mean, "
      "Tensor(b!)[] running_var, Tensor(c!)[] num_batches_tracked, "
      "Tensor[] batch_mean, Tensor[] batch_var, float?[] momentum, "
      "int count) -> ()");
  m.def(
      "dense_block_forward(Tensor input, "
      "Tensor[] norm1_weight, Tensor[] norm1_bias, "
      "Tensor?[] norm1_running_mean, Tensor?[] norm1_running_var, "
      "float[] norm1_eps, Tensor[] conv1_weight, "
      "Tensor[] norm2_weight, Tensor[] norm2_bias, "
      "Tensor?[] norm2_running_mean, Tensor?[] norm2_running_var, "
      "float[] norm2_eps, Tensor[] conv2_weight, "
      "float dropout_p, bool recompute_bottleneck, bool save_for_backward, "
      "str sync_group, int sync_count) "
      "-> (Tensor output, Tensor[] bottlenecks, Tensor channel_mean, "
      "Tensor channel_var, Tensor bottleneck_mean, Tensor bottleneck_var, "
      "Tensor[] dropout_masks)",
      {at::Tag::nondeterministic_seeded});
  m.def(
      "dense_block_backward(Tensor grad_output, Tensor output, "
      "Tensor[] norm1_weight, Tensor[] norm1_bias, "
      "Tensor?[] norm1_running_mean, Tensor?[] norm1_running_var, "
      "float[] norm1_eps, Tensor[] conv1_weight, "
      "Tensor[] norm2_weight, Tensor[] norm2_bias, "
      "Tensor?[] norm2_running_mean, Tensor?[] norm2_running_var, "
      "float[] norm2_eps, Tensor[] conv2_weight, "
      "Tensor[] bottlenecks, Tensor channel_mean, Tensor channel_var, "
      "Tensor bottleneck_mean, Tensor bottleneck_var, "
      "Tensor[] dropout_masks, float dropout_p, str sync_group, "
      "int sync_count) "
      "-> (Tensor grad_input, Tensor[] grad_norm1_weight, "
      "Tensor[] grad_norm1_bias, Tensor[] grad_conv1_weight, "
      "Tensor[] grad_norm2_weight, Tensor[] grad_norm2_bias, "
      "Tensor[] grad_conv2_weight)");
}

namespace densenet_efficient::ops {
namespace {
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(
    const char* name,
    const char* overload = "") {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow(name, overload)
      .typed<Signature>();
}
} // namespace

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& input) {
  static auto op = find_op<decltype(channel_stats)>(
      "densenet_efficient::channel_stats");
  return op.call(input);
}

void bn_relu_out(
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    const at::Tensor& out) {
  static auto op =
      find_op<decltype(bn_relu_out)>("densenet_efficient::bn_relu_out");
  op.call(input, mean, invstd, weight, bias, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    bool batch_stats) {
  static auto op = find_op<decltype(bn_relu_backward)>(
      "densenet_efficient::bn_relu_backward");
  return op.call(grad_output, input, mean, invstd, weight, bias, batch_stats);
}

std::tuple<at::Tensor, at::Tensor> bn_relu_backward_accumulate(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const at::Tensor& mean,
    const at::Tensor& invstd,
    const at::Tensor& weight,
    const at::Tensor& bias,
    bool batch_stats,
    at::Tensor& grad_input_sum) {
  static auto op = find_op<decltype(bn_relu_backward_accumulate)>(
      "densenet_efficient::bn_relu_backward_accumulate");
  return op.call(
      grad_output, input, mean, invstd, weight, bias, batch_stats,
      grad_input_sum);
}

} // namespace densenet_efficient::ops

// `import densenet_efficient._C` loads this library, which registers the
// operators above through static initialisers; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
