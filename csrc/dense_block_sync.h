// Synchronised BatchNorm inside the dense block: batch statistics of the
// global batch over a process group's ranks, with PyTorch's functional
// collectives called through the dispatcher (no process-group object, NCCL
// and gloo alike). Counts stay on the device: no host synchronisation.
#pragma once

#include "dense_block.h"

#include <c10/util/string_view.h>

namespace densenet_efficient::block {

struct SyncBatchNorm {
  c10::string_view group;  // a process group's name; empty: not synchronised

  bool enabled() const {
    return !group.empty();
  }

  Tensor all_reduce_sum(const Tensor& t) const;

  // Replaces the local statistics in `mean` and `var` (a batch of
  // `local_count` values per channel) by those of the global batch of
  // `global_count` values (a one-element tensor on the device).
  void merge(
      const Tensor& mean,
      const Tensor& var,
      int64_t local_count,
      const Tensor& global_count) const;

  // BN-ReLU backward with the statistics of the global batch: the input's
  // gradient written into `grad_input` (added to it with `accumulate`); the
  // local dγ and dβ come back in the parameters' dtype, as
  // DistributedDataParallel averages them like any parameter's gradient.
  std::tuple<Tensor, Tensor> bn_relu_backward(
      const Tensor& grad_output,
      const Tensor& input,
      const Normalization& n,
      const Norm& norm,
      const Tensor& global_count,
      const Tensor& grad_input,
      bool accumulate) const;
};

} // namespace densenet_efficient::block
