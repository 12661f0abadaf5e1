"""Distributed training on CPU with gloo and 2 processes: DDP keeps ranks
equal; with synchronised BatchNorm one step on 2×B equals one
single-process step on the 2B batch; the train command under torchrun."""

import copy
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import assert_results_close, rel_error
from densenet_efficient import models
from densenet_efficient.sync import SyncBatchNorm, synchronize_batch_norm

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, target, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        target(rank, *args)
        # No rank tears gloo down while the other may still be talking to it:
        # once in CI a rank that left first died in teardown (SIGABRT,
        # "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(target, *args):
    mp.spawn(_worker, args=(free_port(), target, args), nprocs=WORLD, join=True)


def _state(model):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()}}


def _initial_model(mode):
    torch.manual_seed(0)
    return models.densenet_bc(16, 4, mode=mode, drop_rate=0.1).double()


def _ddp_steps(rank, out, mode):
    model = _initial_model(mode)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=generator)
        y = torch.randint(0, 10, (4,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    torch.save(_state(model)["params"], f"{out}/rank{rank}.pt")


@pytest.mark.parametrize("mode", ["efficient", "naive"])
def test_ddp_keeps_parameters_equal_across_ranks(tmp_path, mode):
    spawn(_ddp_steps, str(tmp_path), mode)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    # The ranks' starting point, built the same way: every parameter moved from it.
    initial = dict(_initial_model(mode).named_parameters())
    assert all(not torch.equal(v, initial[n]) for n, v in ranks[0].items()), "a parameter was not updated"


# Models whose every BatchNorm is synchronised: a 2-D DenseNet-BC (its
# stem a convolution) and a 3-D DenseNet (stem, transition and final norms
# BatchNorm3d), each with the image size its input takes.
SYNC_MODELS = {
    "2d": (lambda mode: models.densenet_bc(16, 4, mode=mode), (3, 32, 32)),
    "3d": (lambda mode: models.DenseNet(4, (2, 2), 8, num_classes=10, mode=mode, spatial_dims=3), (3, 16, 16, 16)),
}


def _batch(batch_per_rank, image=(3, 32, 32)):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * batch_per_rank, *image, dtype=torch.float64, generator=generator)
    return x, torch.randint(0, 10, (WORLD * batch_per_rank,), generator=generator)


def _one_step(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _sync_step(rank, out, mode, batch_per_rank, spatial):
    build, image = SYNC_MODELS[spatial]
    torch.manual_seed(0)
    model = build(mode).double()
    synchronize_batch_norm(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = _batch(batch_per_rank, image)
    shard = slice(rank * batch_per_rank, (rank + 1) * batch_per_rank)
    _one_step(ddp, x[shard], y[shard])
    if rank == 0:
        torch.save(_state(model), f"{out}/synced.pt")


@pytest.mark.parametrize("mode, spatial", [("efficient", "2d"), ("naive", "2d"), ("checkpoint", "2d"),
                                           ("efficient", "3d"), ("naive", "3d")])
def test_sync_bn_two_ranks_equal_one_process_on_the_double_batch(tmp_path, mode, spatial):
    batch_per_rank = 3
    spawn(_sync_step, str(tmp_path), mode, batch_per_rank, spatial)
    synced = torch.load(tmp_path / "synced.pt")
    build, image = SYNC_MODELS[spatial]
    torch.manual_seed(0)
    single = build(mode).double()
    _one_step(single, *_batch(batch_per_rank, image))
    expected = _state(single)
    for kind in ("params", "buffers"):
        # The 3-D stem's norm0 bias has a zero gradient but for rounding (the
        # first block's batch-statistics norms of pool0's channels): it stays
        # at zero but for ~1e-18.
        assert_results_close(synced[kind], expected[kind], 1e-10, zero=1e-15)


@pytest.mark.parametrize("spatial", ["2d", "3d"])
def test_synchronize_batch_norm_keeps_the_parameter_and_buffer_objects(one_rank_world, spatial):
    build, image = SYNC_MODELS[spatial]
    torch.manual_seed(0)
    model = build("naive")
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    synchronize_batch_norm(model)
    modules = dict(model.named_modules())
    assert norms and all(type(modules[n]) is SyncBatchNorm for n in norms)
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys() and all(now[n] is t for n, t in tensors.items())
    before = {n: t.clone() for n, t in tensors.items()}
    F.cross_entropy(model(torch.randn(4, *image)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    assert not torch.equal(tensors[f"{norms[0]}.weight"], before[f"{norms[0]}.weight"])
    assert not torch.equal(tensors[f"{norms[0]}.running_mean"], before[f"{norms[0]}.running_mean"])


@pytest.mark.parametrize("kind, shape", [(torch.nn.BatchNorm1d, (4, 3)), (torch.nn.BatchNorm1d, (4, 3, 7)),
                                         (torch.nn.BatchNorm2d, (4, 3, 5, 6)), (torch.nn.BatchNorm3d, (2, 3, 4, 5, 3))])
def test_sync_batch_norm_on_one_rank_equals_batch_norm(one_rank_world, kind, shape):
    from conftest import randomize_norms, step_results

    norm = kind(3).double()
    randomize_norms(norm, torch.Generator().manual_seed(0))
    synced = SyncBatchNorm.from_batch_norm(copy.deepcopy(norm))
    x, grad = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    for _ in range(2):  # running statistics move alike
        mine, expected = step_results(synced, x, grad), step_results(norm, x, grad)
        assert mine.keys() == expected.keys()
        assert all(rel_error(mine[n], expected[n]) <= 1e-12 for n in expected if "num_batches" not in n)
        assert torch.equal(mine["num_batches_tracked"], expected["num_batches_tracked"])


def test_without_sync_bn_the_two_differ(tmp_path):
    """The comparison above is not trivially true: per-rank statistics differ."""
    def unsynced_equal_single():
        torch.manual_seed(0)
        single = models.densenet_bc(16, 4).double()
        _one_step(single, *_batch(3))
        torch.manual_seed(0)
        half = models.densenet_bc(16, 4).double()
        x, y = _batch(3)
        _one_step(half, x[:3], y[:3])
        return all(rel_error(p, q) <= 1e-10 for p, q in zip(half.parameters(), single.parameters()))

    assert not unsynced_equal_single()


def test_train_command_under_torchrun(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port", str(free_port()),
        "-m", "densenet_efficient", "train", "--arch", "densenet_bc-10-4", "--epochs", "2", "--batch", "32",
        "--sync-bn", "--no-progress", "--device", "cpu", "--out", str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final test accuracy") == 1  # rank 0 only
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2]
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 2 and checkpoint["arch"] == "densenet_bc-10-4"
