#include "dense_block_sync.h"

#include "ops.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

namespace densenet_efficient::block {
namespace {

// Boxed calls: the argument types of these schemas differ between PyTorch
// versions (the group name is `str` in some, `Any` in others).
Tensor call(const char* name, std::vector<c10::IValue> stack) {
  c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxed(&stack);
  return stack.at(0).toTensor();
}

} // namespace

Tensor SyncBatchNorm::all_reduce_sum(const Tensor& t) const {
  auto reduced = call(
      "_c10d_functional::all_reduce",
      {t.contiguous(), std::string("sum"), std::string(group)});
  return call("_c10d_functional::wait_tensor", {reduced});
}

// Chan's merge of every rank's (count, mean, biased variance) with two
// all-reduces: the global mean from Σ n·mean, then the global M2 from
// Σ (n·var + n·(mean − global mean)²).
void SyncBatchNorm::merge(
    const Tensor& mean,
    const Tensor& var,
    int64_t local_count,
    const Tensor& global_count) const {
  const double n = static_cast<double>(local_count);
  // An empty local batch has NaN statistics; it contributes nothing.
  const auto local_mean = local_count > 0 ? mean : at::zeros_like(mean);
  const auto local_var = local_count > 0 ? var : at::zeros_like(var);
  const auto global_mean = all_reduce_sum(local_mean * n) / global_count;
  const auto m2 = all_reduce_sum((local_var + (local_mean - global_mean).square()) * n);
  mean.copy_(global_mean);
  var.copy_(m2 / global_count);
}

// dγ = r·Σg(x − μ) and dβ = Σg summed over the ranks (in the math type, as
// PyTorch's SyncBatchNorm reduces them), then one elementwise pass with the
// global sums and count, straight into the destination:
//   dx = γ·r·(g − dβ/M − (x − μ)·r·dγ/M)     (M: global count).
std::tuple<Tensor, Tensor> SyncBatchNorm::bn_relu_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Normalization& n,
    const Norm& norm,
    const Tensor& global_count,
    const Tensor& grad_input,
    bool accumulate) const {
  auto [grad_weight, grad_bias] =
      ops::bn_relu_backward_sums(grad_output, input, n.mean, n.var, norm.weight, norm.bias, n.eps);
  const auto global_sums = all_reduce_sum(at::stack({grad_weight, grad_bias}));
  ops::bn_relu_backward_input(
      grad_output, input, n.mean, n.var, norm.weight, norm.bias, n.eps, global_sums[0], global_sums[1],
      global_count, accumulate, grad_input);
  return {grad_weight.to(norm.weight.scalar_type()), grad_bias.to(norm.bias.scalar_type())};
}

} // namespace densenet_efficient::block
