#include "launch_plan.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace densenet_efficient::launch {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Vector lengths to try, widest first: 16, 8 and 4 bytes' worth of elements
// (where that is at least two elements), then one element.
std::vector<int> vector_candidates(int element_size) {
  TORCH_INTERNAL_ASSERT(element_size > 0 && element_size <= kMaxVectorBytes);
  std::vector<int> candidates;
  for (int bytes = kMaxVectorBytes; bytes >= 4; bytes /= 2) {
    if (bytes % element_size == 0 && bytes / element_size >= 2) {
      candidates.push_back(bytes / element_size);
    }
  }
  candidates.push_back(1);
  return candidates;
}

// Whether every tensor's base address and the strides that start a run are
// multiples of the vector. Strides of size-1 dimensions never start a run.
bool aligned(
    int vector,
    int element_size,
    const Shape& shape,
    const std::vector<PlaneLayout>& tensors,
    bool channel_stride_starts_runs) {
  const auto bytes = static_cast<uintptr_t>(vector) * element_size;
  for (const auto& t : tensors) {
    if (t.address % bytes != 0) {
      return false;
    }
    if (shape.batch > 1 && t.stride_n % vector != 0) {
      return false;
    }
    if (channel_stride_starts_runs && shape.channels > 1 && t.stride_c % vector != 0) {
      return false;
    }
  }
  return true;
}

// The widest candidate vector that divides `length` (elements every vector
// stays within) and that every tensor is aligned for.
int widest_vector(
    int64_t length,
    int element_size,
    const Shape& shape,
    const std::vector<PlaneLayout>& tensors,
    bool channel_stride_starts_runs) {
  for (const int vector : vector_candidates(element_size)) {
    if (length % vector == 0 &&
        aligned(vector, element_size, shape, tensors, channel_stride_starts_runs)) {
      return vector;
    }
  }
  return 1;
}

void check_shape(const Shape& shape, int64_t multiprocessors) {
  TORCH_INTERNAL_ASSERT(
      shape.batch > 0 && shape.channels > 0 && shape.plane_size > 0 && multiprocessors > 0,
      "launch plans need a non-empty shape, got [", shape.batch, ", ", shape.channels, ", ",
      shape.plane_size, "]");
}

} // namespace

ElementwisePlan plan_elementwise(
    const Shape& shape,
    int element_size,
    const std::vector<PlaneLayout>& tensors,
    int64_t multiprocessors) {
  check_shape(shape, multiprocessors);
  const bool sample_runs = shape.channels == 1 ||
      std::all_of(tensors.begin(), tensors.end(), [&](const PlaneLayout& t) {
        return t.stride_c == shape.plane_size;
      });
  ElementwisePlan plan;
  plan.channels_per_run = sample_runs ? shape.channels : 1;
  plan.run_length = plan.channels_per_run * shape.plane_size;
  plan.runs = shape.batch * (shape.channels / plan.channels_per_run);
  plan.vector = widest_vector(
      plan.run_length, element_size, shape, tensors, /*channel_stride_starts_runs=*/!sample_runs);
  plan.vectors = plan.runs * (plan.run_length / plan.vector);
  plan.blocks = std::max<int64_t>(
      1,
      std::min(ceil_div(plan.vectors, kThreads), multiprocessors * kElementwiseBlocksPerMultiprocessor));
  // The grid-stride loop's index reaches (vectors - 1) + blocks·threads before
  // it stops, and element offsets inside a run are vector·index: all of that
  // must fit, not only the element count.
  const int64_t step = plan.blocks * kThreads;
  plan.index32 = (plan.vectors + step) * plan.vector <= kInt32Max;
  return plan;
}

ReductionPlan plan_reduction(
    const Shape& shape,
    int element_size,
    const std::vector<PlaneLayout>& tensors,
    int64_t multiprocessors) {
  check_shape(shape, multiprocessors);
  ReductionPlan plan;
  plan.vector = widest_vector(
      shape.plane_size, element_size, shape, tensors, /*channel_stride_starts_runs=*/true);
  plan.vectors_per_plane = shape.plane_size / plan.vector;
  plan.vectors_per_channel = shape.batch * plan.vectors_per_plane;
  const int64_t target_blocks = multiprocessors * kReductionBlocksPerMultiprocessor;
  int64_t chunks = ceil_div(target_blocks, shape.channels);
  chunks = std::min(chunks, std::max<int64_t>(1, plan.vectors_per_channel / kMinVectorsPerBlock));
  chunks = std::clamp<int64_t>(chunks, 1, kMaxGridY);
  plan.chunk = ceil_div(plan.vectors_per_channel, chunks);
  plan.chunks = ceil_div(plan.vectors_per_channel, plan.chunk);  // no block without work
  // A block's loop index reaches the end of its chunk plus one block of
  // threads, and the chunk end itself is formed as begin + chunk.
  plan.index32 =
      plan.vectors_per_channel + std::max<int64_t>(plan.chunk, kThreads) <= kInt32Max;
  return plan;
}

RowPlan plan_rows(int64_t rows, int64_t channels, bool reduction, int64_t multiprocessors) {
  TORCH_INTERNAL_ASSERT(
      rows > 0 && channels > 0 && multiprocessors > 0, "launch plans need a non-empty shape, got ", rows,
      " rows of ", channels, " channels");
  RowPlan plan;
  plan.channel_tiles = ceil_div(channels, kRowTileChannels);
  TORCH_CHECK(
      plan.channel_tiles <= kInt32Max, "kernels over channel rows take at most ",
      kInt32Max * kRowTileChannels, " channels, got ", channels);
  const int64_t blocks_per_multiprocessor =
      reduction ? kReductionBlocksPerMultiprocessor : kElementwiseBlocksPerMultiprocessor;
  const int64_t wanted = ceil_div(multiprocessors * blocks_per_multiprocessor, plan.channel_tiles);
  if (!reduction) {
    plan.row_blocks = std::clamp<int64_t>(std::min(wanted, ceil_div(rows, kRowTileRows)), 1, kMaxGridY);
    return plan;
  }
  const int64_t chunks =
      std::clamp<int64_t>(std::min(wanted, std::max<int64_t>(1, rows / kMinRowsPerChunk)), 1, kMaxGridY);
  plan.chunk = ceil_div(rows, chunks);
  plan.row_blocks = ceil_div(rows, plan.chunk);  // no block without rows
  return plan;
}

} // namespace densenet_efficient::launch
