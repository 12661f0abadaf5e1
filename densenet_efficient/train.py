"""``python -m densenet_efficient train``: the paper's CIFAR recipe.

Defaults: SGD with Nesterov momentum 0.9 (no dampening), weight decay 1e-4,
batch 64, 300 epochs, learning rate 0.1 divided by 10 at 50% and 75% of
training; pad-4 random crop and horizontal flip; per-channel normalisation.
A checkpoint is written atomically at every epoch end; ``--resume`` continues
exactly. Under ``torchrun`` it trains with DistributedDataParallel (NCCL on
CUDA, gloo on CPU), logging and checkpointing on rank 0 only.

Randomness is arranged so that resuming is exact: the data order and the
augmentation of every sample depend only on (seed, epoch, sample); the global
generators (dropout) are saved in the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import builders, data
from .arguments import model_name, non_negative_float, non_negative_int, positive_float, positive_int, probability

CHECKPOINT_FORMAT = 1


class TrainError(ValueError):
    """A configuration or checkpoint the trainer cannot use."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="densenet_bc_100_12", type=model_name,
                        help="a model builder, e.g. densenet_bc_250_24, densenet_bc-40-12")
    parser.add_argument("--data", default="digits", choices=["digits", "cifar10", "cifar100"])
    parser.add_argument("--data-dir", help="folder with the python-pickle CIFAR batches")
    parser.add_argument("--epochs", type=positive_int, default=300)
    parser.add_argument("--batch", type=positive_int, default=64, help="per process")
    parser.add_argument("--lr", type=positive_float, default=0.1)
    parser.add_argument("--momentum", type=non_negative_float, default=0.9)
    parser.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    parser.add_argument("--mode", default="efficient", choices=["naive", "checkpoint", "efficient"])
    parser.add_argument("--recompute-bottleneck", action="store_true")
    parser.add_argument("--drop-rate", type=probability, default=0.0)
    parser.add_argument("--workers", type=non_negative_int, help="DataLoader worker processes (default: one per "
                        "CPU core but one, at most 4)")
    parser.add_argument("--log-every", type=positive_int, default=50,
                        help="steps between progress updates (each reads the running loss back from the device)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--deterministic", action="store_true",
                        help="bitwise repeatable runs and resumes on GPUs too: cuDNN's deterministic algorithms, no "
                        "autotuning, and a warning from any operator that has no deterministic kernel (slower)")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype (fp16 uses a GradScaler)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--sync-bn", action="store_true", help="batch statistics of the global batch (torchrun)")
    parser.add_argument("--eval-batch", type=positive_int, default=256)
    parser.add_argument("--out", help="checkpoint and log folder (default: runs/<arch>-<data>); one that already "
                        "holds a run needs --resume or --overwrite")
    parser.add_argument("--resume", help="a checkpoint to continue from")
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out that holds a run")
    parser.add_argument("--stop-after", type=positive_int, help="stop after this epoch (the schedule still spans --epochs)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- data ----------------------------------------------------------------------


class AugmentedImages(torch.utils.data.Dataset):
    """uint8 images and labels; with `augment`, each sample's crop and flip are
    drawn from a generator seeded by (seed, epoch, index), so any worker
    count, rank or resume gives the same augmentation."""

    def __init__(self, images: data.ImageSet, augment: bool, seed: int):
        self.images, self.augment, self.seed, self.epoch = images, augment, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images.images[index]
        if self.augment:
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
            image = data.augment(image.unsqueeze(0), generator)[0]
        return image, self.images.labels[index]


def default_workers() -> int:
    """Loader processes: one per CPU core but one (the training loop's), at most 4."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _train_loader(dataset, batch: int, seed: int, epoch: int, workers: int, distributed: bool, pin: bool):
    if distributed:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                       pin_memory=pin)


def _test_loader(dataset, batch: int, workers: int, rank: int, world_size: int, pin: bool):
    # Disjoint shards, unpadded: the summed counts are exact.
    shard = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    return torch.utils.data.DataLoader(shard, batch_size=batch, num_workers=workers, pin_memory=pin)


# --- checkpoints ----------------------------------------------------------------


def _rng_state() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomically(obj, path: Path) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename over
    `path` (and fsync the folder): a crash leaves the old checkpoint or the
    new one, never a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: str, arch: str, num_classes: int) -> dict:
    try:
        # Our own checkpoints hold numpy and python RNG states besides tensors:
        # load only checkpoints you trust.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise TrainError(f"--resume {path}: no such file") from None
    except Exception as error:
        raise TrainError(f"--resume {path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"--resume {path}: not a densenet_efficient training checkpoint")
    if checkpoint["arch"] != arch or checkpoint["num_classes"] != num_classes:
        raise TrainError(
            f"--resume {path}: the checkpoint is of {checkpoint['arch']} with {checkpoint['num_classes']} classes, "
            f"but this run trains {arch} with {num_classes} classes"
        )
    return checkpoint


# --- the loop -------------------------------------------------------------------


class Progress:
    """A progress line on a terminal: steps done, the caller's figures, and
    the time the epoch still needs at the pace so far."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled, self.total, self.label = enabled and sys.stderr.isatty(), total, label
        self.started = time.time()

    def show(self, done: int, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.started
        remaining = elapsed / max(done, 1) * (self.total - done)
        clock = f"{elapsed:.0f}s" if final else f"eta {remaining:.0f}s"
        width = 24
        bar = "#" * (width * done // max(self.total, 1))
        print(f"\r{self.label} [{bar:<{width}}] {done}/{self.total} {text} {clock}".ljust(110),
              end="\n" if final else "", file=sys.stderr, flush=True)


def _distributed_setup(device_arg: str):
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and world_size > 1 and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world_size


def _reduce(values: list[float], device, world_size: int) -> list[float]:
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


_RUN_FILES = ("log.jsonl", "checkpoint.pt")


def _check_run_directory(out: Path, args: argparse.Namespace) -> None:
    """A folder that already holds a run is neither appended to nor
    overwritten unless asked: --resume continues it, --overwrite starts over."""
    held = [name for name in _RUN_FILES if (out / name).exists()]
    if held and not (args.resume or args.overwrite):
        raise TrainError(
            f"--out {out} already holds a run ({', '.join(held)}); pass --resume {out / 'checkpoint.pt'} to "
            "continue it, or --overwrite to start over"
        )
    if args.resume and args.overwrite:
        raise TrainError("--resume continues a run and --overwrite starts one over: pass one of them")


@contextmanager
def deterministic_algorithms(enabled: bool):
    """PyTorch's determinism settings for the run, restored after it (the
    command also runs inside other programs, tests among them). cuBLAS needs
    CUBLAS_WORKSPACE_CONFIG for repeatable GEMMs: set for the run unless given."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              cudnn.deterministic, cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]
        if before[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def run(args: argparse.Namespace) -> dict:
    owns_group = not (dist.is_available() and dist.is_initialized())
    device, rank, world_size = _distributed_setup(args.device)
    try:
        with deterministic_algorithms(args.deterministic):
            result = _run(args, device, rank, world_size)
        if world_size > 1:
            dist.barrier()  # no rank tears the group down while another still uses it
        return result
    finally:
        # A process group left alive at exit, or torn down while a peer still
        # talks to it, can abort the process (gloo's threads: "terminate
        # called without an active exception").
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, device, rank: int, world_size: int) -> dict:
    distributed, main_process = world_size > 1, rank == 0
    out = Path(args.out or f"runs/{args.arch}-{args.data}")
    _check_run_directory(out, args)
    if args.sync_bn and not distributed:
        print("--sync-bn: a single process already normalises by its whole batch", file=sys.stderr)
    train_set, test_set = data.load(args.data, args.data_dir)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = builders.builder(args.arch)(
        num_classes=train_set.num_classes, mode=args.mode,
        recompute_bottleneck=args.recompute_bottleneck, drop_rate=args.drop_rate,
    ).to(device)
    if args.sync_bn and distributed:
        from .sync import synchronize_batch_norm

        model = synchronize_batch_norm(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    trained = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    ) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, dampening=0,
                                weight_decay=args.weight_decay, nesterov=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(0.5 * args.epochs), int(0.75 * args.epochs)], gamma=0.1)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    start_epoch = 0
    if args.resume:
        checkpoint = load_checkpoint(args.resume, args.arch, train_set.num_classes)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        _set_rng_state(checkpoint["rng"])
        start_epoch = checkpoint["epoch"]

    train_images = AugmentedImages(train_set, augment=True, seed=args.seed)
    test_images = AugmentedImages(test_set, augment=False, seed=args.seed)
    stats = (train_set.mean, train_set.std)

    workers = default_workers() if args.workers is None else args.workers
    pin = device.type == "cuda"

    def batches(loader):
        for images, labels in loader:
            x = data.normalize(images.to(device, non_blocking=True), *stats).contiguous(memory_format=memory_format)
            yield x, labels.to(device, non_blocking=True)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()

    result = {}
    last_epoch = min(args.epochs, args.stop_after or args.epochs)
    for epoch in range(start_epoch, last_epoch):
        train_images.epoch = epoch
        loader = _train_loader(train_images, args.batch, args.seed, epoch, workers, distributed, pin)
        progress = Progress(main_process and not args.no_progress, len(loader), f"epoch {epoch + 1}/{args.epochs}")
        trained.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # Running sums stay on the device: read back only every --log-every
        # steps and at the epoch's end, so steps queue up without waiting.
        started, seen = time.time(), 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for step, (x, y) in enumerate(batches(loader), 1):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                logits = trained(x)
                loss = F.cross_entropy(logits, y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += len(y)
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            final = step == len(loader)
            if progress.enabled and (final or step % args.log_every == 0):
                memory = f" {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
                progress.show(step, f"loss {loss_sum.item() / seen:.3f} acc {100 * correct.item() / seen:.1f}% "
                                    f"{seen * world_size / (time.time() - started):.0f} img/s{memory}", final=final)
        scheduler.step()
        train_seconds = time.time() - started
        seen, loss_sum, correct = _reduce([seen, loss_sum.item(), correct.item()], device, world_size)
        test_loss, test_accuracy = evaluate(
            trained, batches(_test_loader(test_images, args.eval_batch, workers, rank, world_size, pin)),
            autocast, device, world_size)
        result = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "test_loss": test_loss,
            "test_accuracy": test_accuracy,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_second": seen / train_seconds,
            "seconds": train_seconds,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        }
        if main_process:
            out.mkdir(parents=True, exist_ok=True)
            # A fresh run (--overwrite) starts a fresh log; a resumed one appends.
            with open(out / "log.jsonl", "a" if args.resume or epoch > start_epoch else "w") as log:
                log.write(json.dumps(result) + "\n")
            save_atomically({
                "format": CHECKPOINT_FORMAT, "arch": args.arch, "num_classes": train_set.num_classes,
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                "args": vars(args),
            }, out / "checkpoint.pt")
            plot_curves(out)
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {result['train_loss']:.4f} "
                  f"acc {100 * result['train_accuracy']:.2f}%, test loss {test_loss:.4f} "
                  f"acc {100 * test_accuracy:.2f}%", flush=True)
    if main_process and result:
        finished = "final" if result["epoch"] == args.epochs else f"epoch {result['epoch']} (stopped early)"
        print(f"{finished} test accuracy: {100 * result['test_accuracy']:.2f}%")
    return result


def plot_curves(out: Path) -> Path | None:
    """curves.png in the run folder: loss and accuracy per epoch, train and
    test, from log.jsonl (needs matplotlib; without it, no plot)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [entry["epoch"] for entry in log]
    fig, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "test"):
        loss_axis.plot(epochs, [entry[f"{split}_loss"] for entry in log], "o-", label=split)
        accuracy_axis.plot(epochs, [100 * entry[f"{split}_accuracy"] for entry in log], "o-", label=split)
    for axis, label in ((loss_axis, "loss"), (accuracy_axis, "accuracy %")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(out.name)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate(model, batches, autocast, device, world_size) -> tuple[float, float]:
    model.eval()
    seen = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for x, y in batches:
            with autocast():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    seen, loss_sum, correct = _reduce([seen, loss_sum.item(), correct.item()], device, world_size)
    return loss_sum / seen, correct / seen
