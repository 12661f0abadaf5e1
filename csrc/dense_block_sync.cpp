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

// The fixed-statistics kernel gives dx₀ = γ·r·g and the local sums
// dγ = r·Σg(x − μ), dβ = Σg; with their all-reduced values,
//   dx = dx₀ − γ·r·dβ/M − γ·r²·dγ/M · (x − μ)     (M: global count)
// (PyTorch's SyncBatchNorm does the same). Parameter gradients stay local:
// DistributedDataParallel averages them.
std::tuple<Tensor, Tensor, Tensor> SyncBatchNorm::bn_relu_backward(
    const Tensor& grad_output,
    const Tensor& input,
    const Normalization& n,
    const Norm& norm,
    const Tensor& global_count) const {
  auto [grad_input, grad_weight, grad_bias] = ops::bn_relu_backward(
      grad_output, input, n.mean, n.var, norm.weight, norm.bias, n.eps, /*batch_stats=*/false);
  const auto math = n.mean.scalar_type();
  const auto invstd = at::rsqrt(n.var + n.eps);
  const auto sums = all_reduce_sum(at::stack({grad_weight.to(math), grad_bias.to(math)}));
  const auto scale = norm.weight.to(math) * invstd / global_count;
  std::vector<int64_t> channel_shape(static_cast<size_t>(input.dim()), 1);  // [1, C, 1, ...]
  channel_shape[1] = -1;
  const auto as_channels = [&](const Tensor& v) { return v.view(channel_shape); };
  const auto correction = as_channels(scale * sums[1]) +
      as_channels(scale * invstd * sums[0]) * (input.to(math) - as_channels(n.mean));
  return {
      (grad_input.to(math) - correction).to(input.scalar_type()),
      grad_weight,
      grad_bias};
}

} // namespace densenet_efficient::block
