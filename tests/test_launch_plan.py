"""The CUDA kernels' launch decisions (csrc/launch_plan.h) are pure host
functions: here, on the CPU, over their edge cases. Each plan is also walked
exactly as the kernels walk it (a Python model of their index arithmetic), to
check that it covers every element once with aligned vectors."""

import pytest

from densenet_efficient import _C

INT32_MAX = 2**31 - 1
H100_MULTIPROCESSORS = 132
THREADS = 256


def layout(address, stride_n, stride_c):
    return (address, stride_n, stride_c)


def nchw(batch, channels, plane, address=0, total_channels=None, first_channel=0, element_size=4):
    """A channel slice [first_channel, first_channel + channels) of an NCHW
    tensor of total_channels channels, as (address, stride_n, stride_c)."""
    total = total_channels or channels
    return layout(address + first_channel * plane * element_size, total * plane, plane)


def walk_elementwise(shape, element_size, tensors, plan):
    """Every (n, c, p) the elementwise kernel touches, as it computes them,
    asserting that each vector load/store is aligned for every tensor."""
    batch, channels, plane = shape
    vector, per_run = plan["vector"], plan["channels_per_run"]
    vectors_per_run = plan["run_length"] // vector
    runs_per_sample = plan["runs"] // batch
    seen = []
    for v in range(plan["vectors"]):
        run, j = divmod(v, vectors_per_run)
        n, run_in_sample = divmod(run, runs_per_sample)
        channel_in_run, position = divmod(j * vector, plane)
        c = run_in_sample * per_run + channel_in_run
        for address, stride_n, stride_c in tensors:
            start = address + (n * stride_n + c * stride_c + position) * element_size
            assert start % (vector * element_size) == 0, (v, n, c, position)
        for i in range(vector):  # elements continue into the next plane
            seen.append((n, c + (position + i) // plane, (position + i) % plane))
    return seen


def all_elements(shape):
    batch, channels, plane = shape
    return [(n, c, p) for n in range(batch) for c in range(channels) for p in range(plane)]


@pytest.mark.parametrize(
    "shape, element_size, sliced, expected_vector",
    [
        ((2, 3, 64), 4, False, 4),    # 8x8 float: 16-byte vectors
        ((2, 3, 49), 4, False, 1),    # 7x7, 3 channels: 147 elements per sample, odd
        ((2, 32, 49), 4, False, 4),   # 7x7, 32 channels: a sample's planes are one run of 1568
        ((2, 32, 49), 4, True, 4),    # the same as a channel slice of a wider buffer
        ((2, 6, 196), 2, False, 8),   # 14x14 half, sample runs: 1176 elements
        ((3, 5, 15), 2, False, 1),    # odd everything
        ((2, 64, 1), 4, False, 4),    # 1x1 planes: a vector spans four channels
        ((1, 1, 10), 8, False, 2),    # one plane of doubles
    ],
)
def test_elementwise_plans_cover_every_element_once_aligned(shape, element_size, sliced, expected_vector):
    batch, channels, plane = shape
    if sliced:  # channels 8..8+C of a buffer of C+16 channels, and a contiguous scratch
        tensors = [nchw(batch, channels, plane, 4096, channels + 16, 8, element_size), nchw(batch, channels, plane, 1 << 20)]
    else:
        tensors = [nchw(batch, channels, plane, 4096), nchw(batch, channels, plane, 1 << 20)]
    plan = _C.plan_elementwise(batch, channels, plane, element_size, tensors, H100_MULTIPROCESSORS)
    assert plan["vector"] == expected_vector
    assert plan["channels_per_run"] == channels  # every tensor keeps a sample's planes together
    seen = walk_elementwise(shape, element_size, tensors, plan)
    assert sorted(seen) == all_elements(shape)


def test_elementwise_falls_back_to_planes_when_a_tensor_spaces_its_channels():
    # Planes of 64 floats, channels 72 elements apart: runs are single planes.
    batch, channels, plane = 2, 3, 64
    tensors = [layout(0, channels * 72, 72), nchw(batch, channels, plane, 1 << 20)]
    plan = _C.plan_elementwise(batch, channels, plane, 4, tensors, H100_MULTIPROCESSORS)
    assert plan["channels_per_run"] == 1 and plan["run_length"] == plane and plan["vector"] == 4
    assert sorted(walk_elementwise((batch, channels, plane), 4, tensors, plan)) == all_elements((batch, channels, plane))
    # Channels 66 elements apart: a 16-byte vector would start misaligned in
    # every odd channel, so 8 bytes.
    tensors = [layout(0, channels * 66, 66), nchw(batch, channels, plane, 1 << 20)]
    plan = _C.plan_elementwise(batch, channels, plane, 4, tensors, H100_MULTIPROCESSORS)
    assert plan["vector"] == 2
    assert sorted(walk_elementwise((batch, channels, plane), 4, tensors, plan)) == all_elements((batch, channels, plane))


@pytest.mark.parametrize(
    "address, element_size, expected_vector",
    [(8, 4, 2), (4, 4, 1), (4, 2, 2), (2, 2, 1), (16, 8, 2), (8, 8, 1), (12, 2, 2), (24, 2, 4)],
)
def test_elementwise_vector_follows_base_alignment(address, element_size, expected_vector):
    shape = (2, 4, 64)
    tensors = [nchw(*shape, address=address), nchw(*shape, address=1 << 20)]
    plan = _C.plan_elementwise(*shape, element_size, tensors, H100_MULTIPROCESSORS)
    assert plan["vector"] == expected_vector


def test_elementwise_index_width_counts_the_grid_stride_overshoot():
    """The bug this guards: 32-bit indices chosen because the element count
    fits, while the loop index passes INT32_MAX on its last stride."""
    grid_stride = H100_MULTIPROCESSORS * 16 * THREADS
    plane = 5  # odd: one element per vector
    for elements, fits in [
        (INT32_MAX - grid_stride - 5, True),   # count + stride still fits
        (INT32_MAX - grid_stride + 5, False),  # the count fits, count + stride does not
        (INT32_MAX - 5, False),
        (2**31 + 5, False),
    ]:
        batch = elements // plane
        shape = (batch, 1, plane)
        plan = _C.plan_elementwise(*shape, 4, [nchw(*shape)], H100_MULTIPROCESSORS)
        assert plan["vector"] == 1 and plan["blocks"] == H100_MULTIPROCESSORS * 16
        assert plan["index32"] is fits, elements
        if fits:  # the largest index the kernel forms
            assert (plan["vectors"] - 1 + plan["blocks"] * THREADS) * plan["vector"] <= INT32_MAX


def test_elementwise_index_width_with_wide_vectors():
    """Element offsets are vector × index: vectors of 8 halves reach 8× further."""
    grid_stride = H100_MULTIPROCESSORS * 16 * THREADS
    # 32-bit would do for elements + stride, not for elements + 8 × stride.
    shape = ((INT32_MAX - 4 * grid_stride) // 64, 1, 64)
    plan = _C.plan_elementwise(*shape, 2, [nchw(*shape, element_size=2)], H100_MULTIPROCESSORS)
    assert plan["vector"] == 8 and plan["index32"] is False


def test_elementwise_small_launch_uses_few_blocks():
    plan = _C.plan_elementwise(1, 1, 4, 4, [nchw(1, 1, 4)], H100_MULTIPROCESSORS)
    assert plan["blocks"] == 1 and plan["vectors"] == 1 and plan["index32"] is True


@pytest.mark.parametrize(
    "shape, element_size, expected_vector",
    [((8, 16, 64), 4, 4), ((8, 16, 196), 2, 4), ((8, 16, 49), 4, 1), ((4, 3, 10), 8, 2), ((4, 3, 6), 2, 2)],
)
def test_reduction_plans_cover_each_channel_once(shape, element_size, expected_vector):
    batch, channels, plane = shape
    tensors = [nchw(batch, channels, plane, 4096, channels + 4, 2, element_size)]
    plan = _C.plan_reduction(batch, channels, plane, element_size, tensors, H100_MULTIPROCESSORS)
    assert plan["vector"] == expected_vector
    assert plan["vectors_per_plane"] * plan["vector"] == plane
    per_channel = plan["vectors_per_channel"]
    assert per_channel == batch * plan["vectors_per_plane"]
    chunks, chunk = plan["chunks"], plan["chunk"]
    assert (chunks - 1) * chunk < per_channel <= chunks * chunk  # every block has work, all is covered
    assert chunks <= 65535


def test_reduction_splits_channels_with_many_values_and_keeps_blocks_busy():
    many_values = _C.plan_reduction(64, 40, 32 * 32, 4, [nchw(64, 40, 1024)], H100_MULTIPROCESSORS)
    assert many_values["chunks"] > 1  # [64, 40, 32, 32]: 16384 vectors per channel, split
    assert many_values["chunk"] >= THREADS * 4
    many_channels = _C.plan_reduction(8, 1024, 64, 4, [nchw(8, 1024, 64)], H100_MULTIPROCESSORS)
    assert many_channels["chunks"] == 1
    tiny = _C.plan_reduction(2, 1, 3, 4, [nchw(2, 1, 3)], H100_MULTIPROCESSORS)
    assert tiny["chunks"] == 1 and tiny["chunk"] == 6 and tiny["vector"] == 1


def test_reduction_vector_needs_every_plane_aligned():
    # Channel stride 66 floats: only every other plane starts 16-byte aligned.
    plan = _C.plan_reduction(2, 3, 64, 4, [layout(0, 3 * 66, 66)], H100_MULTIPROCESSORS)
    assert plan["vector"] == 2
    plan = _C.plan_reduction(2, 3, 64, 4, [layout(0, 3 * 64 + 1, 64)], H100_MULTIPROCESSORS)
    assert plan["vector"] == 1  # sample stride odd
    plan = _C.plan_reduction(1, 1, 64, 4, [layout(0, 3, 5)], H100_MULTIPROCESSORS)
    assert plan["vector"] == 4  # strides of size-1 dimensions never start a plane


def test_reduction_index_width():
    # A block's chunk end is formed as begin + chunk: about vectors/528 beyond
    # the last vector here.
    for values, fits in [(INT32_MAX - 5 * 2**20, True), (INT32_MAX - 3 * 2**20, False), (2**31 + 5, False)]:
        plane = 5
        shape = (values // plane, 1, plane)
        plan = _C.plan_reduction(*shape, 4, [nchw(*shape)], H100_MULTIPROCESSORS)
        assert plan["index32"] is fits, values
        if fits:
            assert plan["vectors_per_channel"] + max(plan["chunk"], THREADS) <= INT32_MAX


def test_plans_reject_empty_shapes():
    with pytest.raises(ValueError, match="positive batch"):
        _C.plan_elementwise(0, 3, 4, 4, [], H100_MULTIPROCESSORS)
    with pytest.raises(ValueError, match="element size"):
        _C.plan_reduction(1, 3, 4, 3, [], H100_MULTIPROCESSORS)


# --- kernels over channel rows ----------------------------------------------

ROW_TILE_CHANNELS, ROW_TILE_ROWS = 32, THREADS // 32
MAX_GRID_Y = 65535


def walk_rows(rows, channels, plan, reduction):
    """Every (row, channel) the row kernels visit, as their threads compute
    them: elementwise, a grid-height stride over rows; reductions, each
    block's chunk of rows."""
    seen = []
    for tile in range(plan["channel_tiles"]):
        for block_row in range(plan["row_blocks"]):
            for tx in range(ROW_TILE_CHANNELS):
                c = tile * ROW_TILE_CHANNELS + tx
                if c >= channels:
                    continue
                for ty in range(ROW_TILE_ROWS):
                    if reduction:
                        begin = block_row * plan["chunk"]
                        end = min(rows, begin + plan["chunk"])
                        assert begin < end, "a block without rows"
                        seen += [(r, c) for r in range(begin + ty, end, ROW_TILE_ROWS)]
                    else:
                        step = plan["row_blocks"] * ROW_TILE_ROWS
                        seen += [(r, c) for r in range(block_row * ROW_TILE_ROWS + ty, rows, step)]
    return seen


@pytest.mark.parametrize("reduction", [False, True], ids=["elementwise", "reduction"])
@pytest.mark.parametrize("rows, channels", [(1, 1), (7, 33), (96, 5), (2 * 17 * 17, 64), (3 * 11, 100), (1000, 3)])
def test_row_plans_cover_every_value_once(rows, channels, reduction):
    plan = _C.plan_rows(rows, channels, reduction, 4)
    assert sorted(walk_rows(rows, channels, plan, reduction)) == [(r, c) for r in range(rows) for c in range(channels)]


def test_row_plans_fill_the_device_within_the_grid():
    plan = _C.plan_rows(64 * 32 * 32, 24, False, H100_MULTIPROCESSORS)
    assert plan["channel_tiles"] == 1 and plan["row_blocks"] == H100_MULTIPROCESSORS * 16
    plan = _C.plan_rows(64 * 64 * 64, 24, True, H100_MULTIPROCESSORS)
    assert plan["row_blocks"] == H100_MULTIPROCESSORS * 4
    assert plan["chunk"] * plan["row_blocks"] >= 64 * 64 * 64 > plan["chunk"] * (plan["row_blocks"] - 1)
    # Chunks of no fewer than 128 rows.
    assert _C.plan_rows(64 * 32 * 32, 24, True, H100_MULTIPROCESSORS)["chunk"] == 128
    # A few rows: one chunk, not blocks of a handful of rows each.
    assert _C.plan_rows(100, 24, True, H100_MULTIPROCESSORS)["row_blocks"] == 1
    # Wide channels fill the device with tiles alone.
    assert _C.plan_rows(10**6, 32 * 10**4, True, H100_MULTIPROCESSORS)["row_blocks"] == 1
    # Very many rows stay within gridDim.y.
    for reduction in (False, True):
        assert _C.plan_rows(2**40, 1, reduction, 10**6)["row_blocks"] <= MAX_GRID_Y


def test_row_plans_refuse_bad_shapes():
    for args in [(0, 4, True, 4), (4, 0, False, 4), (4, 4, True, 0), (4, 2**31 * 32, True, 4)]:
        with pytest.raises(ValueError):
            _C.plan_rows(*args)
