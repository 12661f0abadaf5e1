// update_running_stats: nn.BatchNorm2d's running-statistics update of a
// training step for many norms at once, on the device, with no host
// synchronisation (momentum=None reads num_batches_tracked on the device, and
// the count may come from an all-reduce). For each norm:
//   num_batches_tracked += 1
//   factor = momentum, or 1 / num_batches_tracked when momentum is None
//   running_mean = (1 - factor) * running_mean + factor * batch_mean
//   running_var  = (1 - factor) * running_var
//                  + factor * batch_var * count / (count - 1)   (unbiased)
// A batch of fewer than two values per channel (an empty one) only advances
// num_batches_tracked, as ATen does for an empty batch.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <vector>

namespace densenet_efficient {

struct RunningNorm {
  at::Tensor mean;                 // [C_i], contiguous
  at::Tensor var;                  // [C_i], contiguous, mean's dtype
  at::Tensor num_batches_tracked;  // int64, one element
  std::optional<double> momentum;
  int64_t offset;                  // its statistics: batch_*[offset : offset + C_i]
};

struct RunningStatsUpdate {
  std::vector<RunningNorm> norms;
  at::Tensor batch_mean;  // 1-D, contiguous
  at::Tensor batch_var;   // 1-D, contiguous, batch_mean's dtype
  at::Tensor count;       // int64, one element
};

// Checks every argument (before anything is written) and gathers them.
RunningStatsUpdate check_running_stats_args(
    at::TensorList running_mean,
    at::TensorList running_var,
    at::TensorList num_batches_tracked,
    const c10::List<std::optional<double>>& momentum,
    at::IntArrayRef offsets,
    const at::Tensor& batch_mean,
    const at::Tensor& batch_var,
    const at::Tensor& count);

// The operator for a device whose `Kernels::update_running_stats(update)`
// applies a checked, non-empty update.
template <typename Kernels>
void update_running_stats(
    at::TensorList running_mean,
    at::TensorList running_var,
    at::TensorList num_batches_tracked,
    const c10::List<std::optional<double>>& momentum,
    at::IntArrayRef offsets,
    const at::Tensor& batch_mean,
    const at::Tensor& batch_var,
    const at::Tensor& count) {
  const auto update = check_running_stats_args(
      running_mean, running_var, num_batches_tracked, momentum, offsets, batch_mean, batch_var,
      count);
  if (update.norms.empty()) {
    return;
  }
  const c10::DeviceGuard guard(batch_mean.device());
  Kernels::update_running_stats(update);
}

} // namespace densenet_efficient
