// The CUDA running-statistics update, for the CUDA registration of the
// per-channel operators (bn_relu_kernel.cu).
#pragma once

#include "../running_stats.h"

namespace densenet_efficient {

// Applies a checked, non-empty update (check_running_stats_args).
void update_running_stats_cuda(const RunningStatsUpdate& update);

} // namespace densenet_efficient
