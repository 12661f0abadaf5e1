// CUDA kernel of update_running_stats (see ../running_stats.h).
#include "running_stats_kernel.h"

#include "../launch_plan.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

namespace densenet_efficient {
namespace {

using launch::kThreads;

// One block per norm, up to kNormsPerLaunch norms per launch, passed by value
// (well under the 4 KiB of kernel parameters). Thread 0 alone reads and
// advances num_batches_tracked; the factor reaches the other threads through
// shared memory.
constexpr int kNormsPerLaunch = 32;

template <typename running_t>
struct RunningNormArgs {
  running_t* mean;
  running_t* var;
  int64_t* num_batches_tracked;
  int64_t offset;
  int64_t channels;
  double momentum;
  bool has_momentum;
};

template <typename running_t>
struct RunningNormBatch {
  RunningNormArgs<running_t> norms[kNormsPerLaunch];
};

template <typename running_t, typename stat_t>
__global__ void update_running_stats_kernel(
    RunningNormBatch<running_t> batch,
    const stat_t* batch_mean,
    const stat_t* batch_var,
    const int64_t* count) {
  const auto& norm = batch.norms[blockIdx.x];
  __shared__ double factor;
  if (threadIdx.x == 0) {
    const int64_t tracked = *norm.num_batches_tracked + 1;
    *norm.num_batches_tracked = tracked;
    factor = norm.has_momentum ? norm.momentum : 1.0 / static_cast<double>(tracked);
  }
  __syncthreads();
  const int64_t m = *count;
  if (m < 2) {
    return;
  }
  const double unbias = static_cast<double>(m) / static_cast<double>(m - 1);
  for (int64_t c = threadIdx.x; c < norm.channels; c += blockDim.x) {
    const int64_t i = norm.offset + c;
    norm.mean[c] = static_cast<running_t>(
        (1 - factor) * static_cast<double>(norm.mean[c]) +
        factor * static_cast<double>(batch_mean[i]));
    norm.var[c] = static_cast<running_t>(
        (1 - factor) * static_cast<double>(norm.var[c]) +
        factor * unbias * static_cast<double>(batch_var[i]));
  }
}

template <typename running_t, typename stat_t>
void update_running_stats_launch(const RunningStatsUpdate& update) {
  static_assert(sizeof(RunningNormBatch<running_t>) <= 4000, "kernel parameters must fit 4 KiB");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto& norms = update.norms;
  for (size_t first = 0; first < norms.size(); first += kNormsPerLaunch) {
    const size_t count = std::min<size_t>(kNormsPerLaunch, norms.size() - first);
    RunningNormBatch<running_t> batch{};
    for (size_t j = 0; j < count; ++j) {
      const auto& norm = norms[first + j];
      batch.norms[j] = {
          norm.mean.mutable_data_ptr<running_t>(), norm.var.mutable_data_ptr<running_t>(),
          norm.num_batches_tracked.mutable_data_ptr<int64_t>(), norm.offset, norm.mean.numel(),
          norm.momentum.value_or(0.0), norm.momentum.has_value()};
    }
    update_running_stats_kernel<running_t, stat_t><<<static_cast<unsigned>(count), kThreads, 0, stream>>>(
        batch, update.batch_mean.const_data_ptr<stat_t>(), update.batch_var.const_data_ptr<stat_t>(),
        update.count.const_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

} // namespace

void update_running_stats_cuda(const RunningStatsUpdate& update) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, update.batch_mean.scalar_type(), "update_running_stats_cuda", [&] {
        using stat_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kHalf, at::kBFloat16, update.norms.front().mean.scalar_type(),
            "update_running_stats_cuda", [&] { update_running_stats_launch<scalar_t, stat_t>(update); });
      });
}

} // namespace densenet_efficient
