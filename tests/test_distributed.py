"""Distributed training on CPU with gloo and 2 processes: DDP keeps ranks
equal; with synchronised BatchNorm one step on 2×B equals one
single-process step on the 2B batch; the train command under torchrun."""

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

from conftest import rel_error
from densenet_efficient import models
from densenet_efficient.sync import synchronize_batch_norm

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


def _batch(batch_per_rank):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(WORLD * batch_per_rank, 3, 32, 32, dtype=torch.float64, generator=generator)
    return x, torch.randint(0, 10, (WORLD * batch_per_rank,), generator=generator)


def _one_step(model, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _sync_step(rank, out, mode, batch_per_rank):
    torch.manual_seed(0)
    model = models.densenet_bc(16, 4, mode=mode).double()
    synchronize_batch_norm(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x, y = _batch(batch_per_rank)
    shard = slice(rank * batch_per_rank, (rank + 1) * batch_per_rank)
    _one_step(ddp, x[shard], y[shard])
    if rank == 0:
        torch.save(_state(model), f"{out}/synced.pt")


@pytest.mark.parametrize("mode", ["efficient", "naive", "checkpoint"])
def test_sync_bn_two_ranks_equal_one_process_on_the_double_batch(tmp_path, mode):
    batch_per_rank = 3
    spawn(_sync_step, str(tmp_path), mode, batch_per_rank)
    synced = torch.load(tmp_path / "synced.pt")
    torch.manual_seed(0)
    single = models.densenet_bc(16, 4, mode=mode).double()
    _one_step(single, *_batch(batch_per_rank))
    expected = _state(single)
    for kind in ("params", "buffers"):
        for name, value in expected[kind].items():
            assert rel_error(synced[kind][name], value) <= 1e-10, (kind, name)


def test_synchronize_batch_norm_keeps_the_parameter_and_buffer_objects(one_rank_world):
    torch.manual_seed(0)
    model = models.densenet_bc(16, 4, mode="naive")
    norms = [n for n, m in model.named_modules() if type(m) is torch.nn.BatchNorm2d]
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    synchronize_batch_norm(model)
    modules = dict(model.named_modules())
    assert norms and all(type(modules[n]).__name__ == "SyncBatchNorm2d" for n in norms)
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys() and all(now[n] is t for n, t in tensors.items())
    before = {n: t.clone() for n, t in tensors.items()}
    F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    optimizer.step()
    assert not torch.equal(tensors[f"{norms[0]}.weight"], before[f"{norms[0]}.weight"])
    assert not torch.equal(tensors[f"{norms[0]}.running_mean"], before[f"{norms[0]}.running_mean"])


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
