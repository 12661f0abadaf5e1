"""The train command: the embedded digits data learns, resuming is exact,
checkpoints are checked, CIFAR's pickle batches are read (and bad ones
named), AMP and channels-last run."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from densenet_efficient import data
from conftest import requires_cuda
from densenet_efficient.__main__ import main

pytest.importorskip("sklearn")


def train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    main(["train", "--no-progress", "--out", str(out), *extra])
    return out, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_digits_loss_falls_and_accuracy_beats_chance(tmp_path, capsys):
    _, log = train(tmp_path, "--arch", "densenet_bc-28-8", "--epochs", "4")
    assert [entry["epoch"] for entry in log] == [1, 2, 3, 4]
    assert log[-1]["train_loss"] < 0.8 * log[0]["train_loss"]
    assert log[-1]["test_accuracy"] > 0.6  # chance: 0.1; the README quotes this bound
    assert f"final test accuracy: {100 * log[-1]['test_accuracy']:.2f}%" in capsys.readouterr().out
    assert log[0]["lr"] == 0.1 and log[-1]["lr"] == pytest.approx(0.001)  # /10 at 50% and 75%


def test_a_run_draws_its_curves_and_reads_nothing_back_per_step(tmp_path, monkeypatch):
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or item(self))
    out, log = train(tmp_path, "--arch", "densenet_bc-10-4", "--epochs", "1", "--batch", "32")
    steps = -(-1438 // 32)  # the digits' training images
    assert len(reads) <= 6 < steps  # the epoch's sums, train and test: not one per step
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])])
def test_resume_is_exact(tmp_path, device):
    """Bitwise, with --deterministic (cuDNN's backward may otherwise add in
    any order), which leaves PyTorch's settings as it found them."""
    common = ["--arch", "densenet_bc-10-4", "--epochs", "2", "--drop-rate", "0.2", "--device", device,
              "--deterministic"]
    cublas_config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    straight, _ = train(tmp_path, *common, name="straight")
    split, _ = train(tmp_path, *common, "--stop-after", "1", name="split")
    first_half = torch.load(split / "checkpoint.pt", weights_only=False)
    assert first_half["epoch"] == 1
    train(tmp_path, *common, "--resume", str(split / "checkpoint.pt"), name="split")
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(split / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == cublas_config


def refused(argv, message, capsys):
    """The command exits 2 with one line on stderr that says `message`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_resume_rejects_another_architecture_and_broken_files(tmp_path, capsys):
    out, _ = train(tmp_path, "--arch", "densenet_bc-10-4", "--epochs", "1")
    refused(["train", "--no-progress", "--arch", "densenet_bc-16-4", "--epochs", "2",
             "--out", str(tmp_path / "other"), "--resume", str(out / "checkpoint.pt")],
            "the checkpoint is of densenet_bc-10-4 with 10 classes, but this run trains densenet_bc-16-4", capsys)
    assert not (tmp_path / "other").exists()  # refused before anything was written
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    refused(["train", "--arch", "densenet_bc-10-4", "--resume", str(broken), "--out", str(tmp_path / "x")],
            "broken.pt: not a readable checkpoint", capsys)
    refused(["train", "--arch", "densenet_bc-10-4", "--resume", str(tmp_path / "missing.pt"),
             "--out", str(tmp_path / "x")], "missing.pt: no such file", capsys)


def test_a_folder_holding_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    out, first = train(tmp_path, "--arch", "densenet_bc-10-4", "--epochs", "1")
    checkpoint = (out / "checkpoint.pt").read_bytes()
    refused(["train", "--no-progress", "--arch", "densenet_bc-10-4", "--epochs", "1", "--out", str(out)],
            f"--out {out} already holds a run (log.jsonl, checkpoint.pt); pass --resume", capsys)
    assert (out / "checkpoint.pt").read_bytes() == checkpoint and len(first) == 1  # untouched
    _, again = train(tmp_path, "--arch", "densenet_bc-10-4", "--epochs", "1", "--overwrite")
    assert len(again) == 1  # a fresh log, not an appended one


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    from densenet_efficient import train as train_module

    path = tmp_path / "checkpoint.pt"
    train_module.save_atomically({"v": 1}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train_module.os, "replace", crash)
    with pytest.raises(OSError):
        train_module.save_atomically({"v": 2}, path)
    assert torch.load(path)["v"] == 1  # the old checkpoint is intact


def _write_cifar(root, name, per_batch=20, corrupt=None, missing=None):
    folder = root / {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    key, classes = (b"labels", 10) if name == "cifar10" else (b"fine_labels", 100)
    for file in files:
        if file == missing:
            continue
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, per_batch).tolist()}
        with open(folder / file, "wb") as f:
            if file == corrupt:
                f.write(b"\x80\x04garbage")
            else:
                pickle.dump(batch, f)
    return folder


@pytest.mark.parametrize("name, classes, train_size", [("cifar10", 10, 100), ("cifar100", 100, 20)])
def test_cifar_reader(tmp_path, name, classes, train_size):
    folder = _write_cifar(tmp_path, name)
    for data_dir in (tmp_path, folder):  # the parent or the batch folder itself
        train_set, test_set = data.load(name, data_dir)
        assert train_set.images.shape == (train_size, 3, 32, 32) and train_set.images.dtype == torch.uint8
        assert len(test_set) == 20 and train_set.num_classes == classes
        assert 0.4 < train_set.mean[0] < 0.6 and 0.2 < train_set.std[0] < 0.4
    with open(next(folder.iterdir()), "rb") as f:
        first = pickle.load(f, encoding="bytes")
    name_of_first = next(folder.iterdir()).name
    reread = data._read_batch(folder / name_of_first, b"labels" if name == "cifar10" else b"fine_labels", classes, name)
    assert torch.equal(reread[0][0].reshape(-1), torch.as_tensor(first[b"data"][0]))


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"missing": "data_batch_3"}, r"data_batch_3: missing"),
        ({"corrupt": "test_batch"}, r"test_batch: not a readable CIFAR batch"),
    ],
)
def test_cifar_reader_names_the_bad_file(tmp_path, damage, message):
    _write_cifar(tmp_path, "cifar10", **damage)
    with pytest.raises(data.DataError, match=message):
        data.load("cifar10", tmp_path)


def test_cifar_errors_reach_the_command_line(tmp_path, capsys):
    refused(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")],
            "no such directory", capsys)
    refused(["train", "--data", "cifar100", "--out", str(tmp_path / "x")], "needs --data-dir", capsys)
    tmp_path.joinpath("empty").mkdir()
    refused(["train", "--data", "cifar10", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x")],
            "data_batch_1: missing (expected cifar10's python-pickle batches data_batch_1..data_batch_5 and "
            "test_batch in", capsys)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_on_cifar_batches_amp_and_channels_last(tmp_path, amp):
    _write_cifar(tmp_path, "cifar10", per_batch=16)
    out, log = train(tmp_path, "--data", "cifar10", "--data-dir", str(tmp_path), "--arch", "densenet_bc-10-4",
                     "--epochs", "1", "--batch", "16", "--amp", amp, "--channels-last", "--workers", "1")
    assert log[0]["epoch"] == 1 and np.isfinite(log[0]["train_loss"])
    scaler = torch.load(out / "checkpoint.pt", weights_only=False)["scaler"]
    assert bool(scaler) == (amp == "fp16")  # a GradScaler's state only for fp16


def test_augmentation_is_the_papers():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    out = data.augment(images, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 9, (6,), generator=generator), torch.randint(0, 9, (6,), generator=generator)
    flip = torch.rand(6, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(6):
        crop = padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
        assert torch.equal(out[i], crop.flip(2) if flip[i] else crop)
