#include "running_stats.h"

#include "per_channel_ops.h"

#include <c10/util/Exception.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace densenet_efficient {

namespace {
constexpr const char* kOp = "update_running_stats";

void check_counter(const at::Tensor& t, const char* name, const at::Tensor& batch_mean) {
  TORCH_CHECK_VALUE(
      t.numel() == 1 && t.scalar_type() == at::kLong, kOp, ": expected ", name,
      " to be one int64 value, got a ", t.scalar_type(), " tensor of shape ", t.sizes());
  TORCH_CHECK(
      t.device() == batch_mean.device(), kOp, ": expected ", name, " on ", batch_mean.device(),
      " (the batch statistics' device), got it on ", t.device());
}

// Every tensor the update writes must be its own memory, apart from the others
// and from the batch statistics it reads: on the GPU each norm is a block of
// its own, and a shared num_batches_tracked would lose an increment. The
// written tensors are contiguous, so each is one byte range: sorted by start,
// a written range may not start before any earlier range ends, nor any range
// before an earlier written one ends.
void check_distinct(const RunningStatsUpdate& update) {
  struct Range {
    uintptr_t first, end;
    bool written;
  };
  std::vector<Range> ranges;
  const auto add = [&](const at::Tensor& t, bool written) {
    if (t.numel() > 0) {
      const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      ranges.push_back({first, first + static_cast<uintptr_t>(t.numel() * t.element_size()), written});
    }
  };
  for (const auto& norm : update.norms) {
    add(norm.mean, true);
    add(norm.var, true);
    add(norm.num_batches_tracked, true);
  }
  add(update.batch_mean, false);
  add(update.batch_var, false);
  add(update.count, false);
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.first < b.first; });
  uintptr_t end_of_all = 0, end_of_written = 0;  // the furthest any earlier range reaches
  for (const auto& range : ranges) {
    TORCH_CHECK(
        range.first >= end_of_written && (!range.written || range.first >= end_of_all), kOp,
        ": the running statistics and num_batches_tracked of every norm must be tensors of their "
        "own, apart from each other and from the batch statistics; two of them share memory");
    end_of_all = std::max(end_of_all, range.end);
    if (range.written) {
      end_of_written = std::max(end_of_written, range.end);
    }
  }
}

} // namespace

RunningStatsUpdate check_running_stats_args(
    at::TensorList running_mean,
    at::TensorList running_var,
    at::TensorList num_batches_tracked,
    const c10::List<std::optional<double>>& momentum,
    at::IntArrayRef offsets,
    const at::Tensor& batch_mean,
    const at::Tensor& batch_var,
    const at::Tensor& count) {
  const auto n = running_mean.size();
  TORCH_CHECK_VALUE(
      running_var.size() == n && num_batches_tracked.size() == n && momentum.size() == n &&
          offsets.size() == n,
      kOp, ": expected one entry per norm (", n, ") in every list, got ", running_var.size(),
      " running_var, ", num_batches_tracked.size(), " num_batches_tracked, ", momentum.size(),
      " momentum, ", offsets.size(), " offsets");
  TORCH_CHECK_VALUE(
      batch_mean.dim() == 1 && batch_var.sizes() == batch_mean.sizes(), kOp,
      ": expected batch_mean and batch_var to be 1-D of one length, got shapes ",
      batch_mean.sizes(), " and ", batch_var.sizes());
  TORCH_CHECK_TYPE(
      is_kernel_float(batch_mean.scalar_type()) &&
          batch_var.scalar_type() == batch_mean.scalar_type(),
      kOp, ": expected batch statistics of one dtype, ", kKernelFloats, ", got ",
      batch_mean.scalar_type(), " and ", batch_var.scalar_type());
  TORCH_CHECK(
      batch_var.device() == batch_mean.device(), kOp,
      ": expected batch_mean and batch_var on one device, got ", batch_mean.device(), " and ",
      batch_var.device());
  check_counter(count, "count", batch_mean);

  RunningStatsUpdate update{{}, batch_mean.contiguous(), batch_var.contiguous(), count};
  for (const auto i : c10::irange(n)) {
    const auto& mean = running_mean[i];
    const auto& var = running_var[i];
    TORCH_CHECK_VALUE(
        mean.dim() == 1 && var.sizes() == mean.sizes(), kOp, ": norm ", i,
        ": expected running_mean and running_var to be 1-D of one length, got shapes ",
        mean.sizes(), " and ", var.sizes());
    TORCH_CHECK_VALUE(
        offsets[i] >= 0 && offsets[i] + mean.numel() <= batch_mean.numel(), kOp, ": norm ", i,
        ": its ", mean.numel(), " statistics from offset ", offsets[i],
        " do not lie within the ", batch_mean.numel(), " batch statistics");
    TORCH_CHECK_TYPE(
        is_kernel_float(mean.scalar_type()) && is_kernel_float(var.scalar_type()), kOp, ": norm ", i,
        ": expected running statistics of ", kKernelFloats, ", got ", mean.scalar_type(), " and ",
        var.scalar_type());
    TORCH_CHECK_TYPE(
        var.scalar_type() == mean.scalar_type() && mean.scalar_type() == running_mean[0].scalar_type(),
        kOp, ": expected every running statistic in one floating-point dtype (",
        running_mean[0].scalar_type(), "), norm ", i, " has ", mean.scalar_type(), " and ",
        var.scalar_type());
    TORCH_CHECK(
        mean.device() == batch_mean.device() && var.device() == batch_mean.device(), kOp,
        ": norm ", i, ": expected running statistics on ", batch_mean.device(), ", got ",
        mean.device(), " and ", var.device());
    TORCH_CHECK_VALUE(
        mean.is_contiguous() && var.is_contiguous(), kOp, ": norm ", i,
        ": expected contiguous running statistics");
    check_counter(num_batches_tracked[i], "num_batches_tracked", batch_mean);
    update.norms.push_back({mean, var, num_batches_tracked[i], momentum.get(i), offsets[i]});
  }
  check_distinct(update);
  return update;
}

} // namespace densenet_efficient
