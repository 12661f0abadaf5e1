// Launch decisions of the CUDA kernels (vector width, how memory is walked,
// 32- or 64-bit index arithmetic, grid shape) as pure host functions. They
// hold no CUDA code, so they are compiled into every build and CPU tests cover
// their edge cases; the kernels only carry the plans out.
#pragma once

#include <cstdint>
#include <vector>

namespace densenet_efficient::launch {

constexpr int kThreads = 256;
// Widest load/store: 16 bytes (4 float, 8 half/bfloat16, 2 double).
constexpr int kMaxVectorBytes = 16;
// Grid of the elementwise kernels: at most this many blocks per multiprocessor
// (each thread then loops).
constexpr int64_t kElementwiseBlocksPerMultiprocessor = 16;
// Reductions: about this many blocks per multiprocessor, none with fewer than
// kMinVectorsPerBlock vectors to reduce.
constexpr int64_t kReductionBlocksPerMultiprocessor = 4;
constexpr int64_t kMinVectorsPerBlock = kThreads * 4;
constexpr int64_t kMaxGridY = 65535;

// The [N, C, P] shape of a tensor as the kernels see it: P = D·H·W (or H·W, or
// L) elements per plane, every plane one contiguous run of memory.
struct Shape {
  int64_t batch;
  int64_t channels;
  int64_t plane_size;
};

// Where a tensor's planes lie: base address in bytes and the element strides
// between samples and between channels.
struct PlaneLayout {
  uintptr_t address;
  int64_t stride_n;
  int64_t stride_c;
};

// Elementwise kernels walk "runs": the longest stretches that every tensor
// stores contiguously and in the same order. When every tensor keeps a
// sample's planes back to back (stride_c == P: NCHW tensors and channel slices
// of them), a run is one sample's C·P elements; otherwise it is one plane.
// A vector may then cross from one channel's plane into the next.
struct ElementwisePlan {
  int vector = 1;                // elements per load/store
  int64_t channels_per_run = 1;  // C (a sample's planes are one run) or 1
  int64_t run_length = 0;        // elements per run
  int64_t runs = 0;              // N·C / channels_per_run
  int64_t vectors = 0;           // vectors over all runs
  int64_t blocks = 0;            // grid size (1-D, grid-stride loop)
  bool index32 = false;          // every index the kernel forms fits int32
};

// Per-channel reductions: block (c, s) reduces chunk s of channel c's N·P
// elements, read in vectors that never cross a plane.
struct ReductionPlan {
  int vector = 1;
  int64_t vectors_per_plane = 0;
  int64_t vectors_per_channel = 0;
  int64_t chunks = 0;  // blocks per channel (gridDim.y)
  int64_t chunk = 0;   // vectors per block
  bool index32 = false;
};

// `tensors` are every tensor the kernel reads or writes with this shape;
// `element_size` their element size in bytes. Shapes must be non-empty.
ElementwisePlan plan_elementwise(
    const Shape& shape,
    int element_size,
    const std::vector<PlaneLayout>& tensors,
    int64_t multiprocessors);

ReductionPlan plan_reduction(
    const Shape& shape,
    int element_size,
    const std::vector<PlaneLayout>& tensors,
    int64_t multiprocessors);

// Kernels over channel rows (channels-last tensors and channel slices of
// them: N·P rows of C values, each row's values contiguous, rows a fixed
// stride apart) run blocks of kRowTileChannels × kRowTileRows threads, a
// warp reading consecutive channels of one row. gridDim.x counts tiles of
// kRowTileChannels channels; gridDim.y counts row blocks: elementwise, each
// thread then steps over rows a grid's height apart; in reductions, block
// (tile, s) reduces rows [s·chunk, (s+1)·chunk) of its channels into one
// partial result per channel.
constexpr int kRowTileChannels = 32;
constexpr int kRowTileRows = kThreads / kRowTileChannels;
// Reductions: no block with fewer rows than this (each thread then adds at
// least 16 values).
constexpr int64_t kMinRowsPerChunk = kRowTileRows * 16;

struct RowPlan {
  int64_t channel_tiles = 0;  // gridDim.x
  int64_t row_blocks = 0;     // gridDim.y: row blocks, or chunks (reductions)
  int64_t chunk = 0;          // reductions: rows per block
};

RowPlan plan_rows(int64_t rows, int64_t channels, bool reduction, int64_t multiprocessors);

} // namespace densenet_efficient::launch
