// The CUDA kernels' launch machinery, shared by every kernel file: tensors as
// planes, vector loads and stores, and the two kernel shapes, carried out
// exactly as the host plans in ../launch_plan.h say (vector width, runs,
// 32- or 64-bit indices, grid):
// * for_each_vector: a grid-stride loop over runs (a sample's C planes back to
//   back where every tensor allows, else one plane) in vectors; a vector may
//   cross from one channel's plane into the next.
// * reduce_chunks: per-channel reductions, each channel's N·P values (P: plane) split
//   into S chunks, one block per (channel, chunk), partial results written in
//   a fixed order for a finalize kernel to merge: deterministic, no atomics.
// Index divisions use ATen's precomputed-reciprocal IntDivider.
#pragma once

#include "../launch_plan.h"
#include "../per_channel_ops.h"

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace densenet_efficient::gpu {

using at::cuda::detail::IntDivider;
using launch::kThreads;
constexpr int kWarpSize = 32;

inline int64_t multiprocessors(const at::Tensor& t) {
  return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount;
}

inline launch::Shape shape_of(const at::Tensor& t) {
  return {t.size(0), t.size(1), plane_size(t)};
}

inline launch::PlaneLayout layout_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_contiguous_planes(t));
  return {reinterpret_cast<uintptr_t>(t.const_data_ptr()), t.stride(0), t.stride(1)};
}

template <typename T>
struct Planes {
  T* data;
  int64_t stride_n;
  int64_t stride_c;

  __device__ T* at(int64_t n, int64_t c, int64_t position) const {
    return data + n * stride_n + c * stride_c + position;
  }
};

// `t`'s data as T*: through const_data_ptr for a const T (no copy-on-write
// materialisation for what is only read).
template <typename T>
T* data_of(const at::Tensor& t) {
  if constexpr (std::is_const_v<T>) {
    return static_cast<T*>(t.const_data_ptr());
  } else {
    return static_cast<T*>(t.mutable_data_ptr());
  }
}

template <typename T>
Planes<T> planes_of(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(has_contiguous_planes(t));
  return {data_of<T>(t), t.stride(0), t.stride(1)};
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <int VEC, typename scalar_t>
__device__ __forceinline__ Pack<scalar_t, VEC> load(const scalar_t* p) {
  return *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
}

template <int VEC, typename scalar_t>
__device__ __forceinline__ void store(scalar_t* p, const Pack<scalar_t, VEC>& pack) {
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pack;
}

// Calls f(std::integral_constant<int, VEC>) for the plan's vector length,
// instantiating only the lengths a plan can choose for scalar_t.
template <typename scalar_t, typename F>
void with_vector(int vector, const F& f) {
  constexpr int size = sizeof(scalar_t);
  if constexpr (16 / size >= 2) {
    if (vector == 16 / size) {
      return f(std::integral_constant<int, 16 / size>{});
    }
  }
  if constexpr (8 / size >= 2) {
    if (vector == 8 / size) {
      return f(std::integral_constant<int, 8 / size>{});
    }
  }
  if constexpr (4 / size >= 2) {
    if (vector == 4 / size) {
      return f(std::integral_constant<int, 4 / size>{});
    }
  }
  TORCH_INTERNAL_ASSERT(vector == 1, "no kernel for vectors of ", vector, " elements");
  f(std::integral_constant<int, 1>{});
}

// Calls f(index_t{}) with uint32_t when the plan allows 32-bit indices.
template <typename F>
void with_index(bool index32, const F& f) {
  if (index32) {
    f(uint32_t{});
  } else {
    f(int64_t{});
  }
}

// ---------------------------------------------------------------------------
// Elementwise over all runs. `Op` is called with (n, c, position in plane) of
// each vector's first element; its kVec elements are contiguous in memory and
// continue into plane c + 1 when they pass the end of plane c.

template <typename index_t>
struct RunGeometry {
  IntDivider<index_t> vectors_per_run;
  IntDivider<index_t> runs_per_sample;
  IntDivider<index_t> plane_size;
  index_t channels_per_run;
};

template <typename index_t, typename Op>
__global__ void __launch_bounds__(kThreads) for_each_vector_kernel(
    index_t vectors,
    RunGeometry<index_t> geometry,
    Op op) {
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t v = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors;
       v += step) {
    const auto in_run = geometry.vectors_per_run.divmod(v);
    const auto in_sample = geometry.runs_per_sample.divmod(in_run.div);
    const auto in_plane = geometry.plane_size.divmod(in_run.mod * static_cast<index_t>(Op::kVec));
    op(static_cast<int64_t>(in_sample.div),
       static_cast<int64_t>(in_sample.mod * geometry.channels_per_run + in_plane.div),
       static_cast<int64_t>(in_plane.mod));
  }
}

template <template <int> class Op, typename scalar_t, typename... Args>
void launch_for_each_vector(
    const at::Tensor& like,
    std::initializer_list<const at::Tensor*> tensors,
    Args... args) {
  std::vector<launch::PlaneLayout> layouts;
  for (const auto* t : tensors) {
    layouts.push_back(layout_of(*t));
  }
  const auto shape = shape_of(like);
  const auto plan =
      launch::plan_elementwise(shape, sizeof(scalar_t), layouts, multiprocessors(like));
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_vector<scalar_t>(plan.vector, [&](auto vec) {
    using OpType = Op<decltype(vec)::value>;
    const OpType op{args..., shape.plane_size};
    with_index(plan.index32, [&](auto index) {
      using index_t = decltype(index);
      const RunGeometry<index_t> geometry{
          IntDivider<index_t>(static_cast<index_t>(plan.run_length / plan.vector)),
          IntDivider<index_t>(static_cast<index_t>(plan.runs / shape.batch)),
          IntDivider<index_t>(static_cast<index_t>(shape.plane_size)),
          static_cast<index_t>(plan.channels_per_run)};
      for_each_vector_kernel<index_t, OpType><<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(
          static_cast<index_t>(plan.vectors), geometry, op);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// ---------------------------------------------------------------------------
// Per-channel reductions. A Reducer names its Reduction (State, identity(),
// merge(a, b) and shuffle_down(state, offset): how partial states combine
// across threads, warps and chunks), and has channel(c) (what is constant
// over a channel, formed once per block) and accumulate(state, channel, n,
// position) for one vector.

// The block's total, valid in thread 0. Called once per kernel (its shared
// array is not reused), with blockDim.x a multiple of the warp size.
template <typename Reduction>
__device__ typename Reduction::State block_reduce(typename Reduction::State state) {
  using State = typename Reduction::State;
  __shared__ State warp_results[kThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    state = Reduction::merge(state, Reduction::shuffle_down(state, offset));
  }
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    warp_results[warp] = state;
  }
  __syncthreads();
  if (warp == 0) {
    state = lane < static_cast<int>(blockDim.x / kWarpSize) ? warp_results[lane] : Reduction::identity();
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      state = Reduction::merge(state, Reduction::shuffle_down(state, offset));
    }
  }
  return state;
}

// Block (c, s) reduces vectors [s·chunk, (s+1)·chunk) of channel c's
// N·vectors_per_plane vectors into partials[c·S + s].
template <typename index_t, typename Reducer>
__global__ void __launch_bounds__(kThreads) reduce_chunks_kernel(
    index_t vectors_per_channel,
    IntDivider<index_t> vectors_per_plane,
    index_t chunk,
    Reducer reducer,
    typename Reducer::Reduction::State* partials) {
  using Reduction = typename Reducer::Reduction;
  const int64_t c = blockIdx.x;
  const index_t begin = static_cast<index_t>(blockIdx.y) * chunk;
  const index_t end = begin + chunk < vectors_per_channel ? begin + chunk : vectors_per_channel;
  const auto channel = reducer.channel(c);
  auto state = Reduction::identity();
  for (index_t v = begin + threadIdx.x; v < end; v += blockDim.x) {
    const auto in_plane = vectors_per_plane.divmod(v);
    reducer.accumulate(
        state, channel, static_cast<int64_t>(in_plane.div),
        static_cast<int64_t>(in_plane.mod) * Reducer::kVec);
  }
  state = block_reduce<Reduction>(state);
  if (threadIdx.x == 0) {
    partials[c * gridDim.y + blockIdx.y] = state;
  }
}

// Launches Reducer<VEC>{args...} over `tensors` (the first gives the shape);
// returns the partials ([C·S] states, as bytes) and the number S of chunks.
template <template <int> class Reducer, typename scalar_t, typename... Args>
std::pair<at::Tensor, int64_t> launch_reduce_chunks(
    std::initializer_list<const at::Tensor*> tensors,
    Args... args) {
  const at::Tensor& like = **tensors.begin();
  std::vector<launch::PlaneLayout> layouts;
  for (const auto* t : tensors) {
    layouts.push_back(layout_of(*t));
  }
  const auto shape = shape_of(like);
  const auto plan = launch::plan_reduction(shape, sizeof(scalar_t), layouts, multiprocessors(like));
  TORCH_CHECK(
      shape.channels <= std::numeric_limits<int32_t>::max(),
      "per-channel reductions launch one block column per channel: at most 2^31 - 1 channels, got ",
      shape.channels);
  at::Tensor partials;
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_vector<scalar_t>(plan.vector, [&](auto vec) {
    using R = Reducer<decltype(vec)::value>;
    using State = typename R::Reduction::State;
    partials = at::empty(
        {shape.channels * plan.chunks * static_cast<int64_t>(sizeof(State))},
        like.options().dtype(at::kByte));
    const dim3 grid(static_cast<unsigned>(shape.channels), static_cast<unsigned>(plan.chunks));
    with_index(plan.index32, [&](auto index) {
      using index_t = decltype(index);
      reduce_chunks_kernel<index_t, R><<<grid, kThreads, 0, stream>>>(
          static_cast<index_t>(plan.vectors_per_channel),
          IntDivider<index_t>(static_cast<index_t>(plan.vectors_per_plane)),
          static_cast<index_t>(plan.chunk), R{args...},
          reinterpret_cast<State*>(partials.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {partials, plan.chunks};
}

inline int64_t finalize_blocks(int64_t channels) {
  return (channels + kThreads - 1) / kThreads;
}

} // namespace densenet_efficient::gpu
