"""Datasets for training, as in-memory uint8 image tensors: CIFAR-10/100
from their standard python-pickle batches (no torchvision needed), and
scikit-learn's bundled 8×8 handwritten digits upsampled to 32×32 (no
download: the command runs anywhere)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["DataError", "ImageSet", "load", "augment", "normalize"]


class DataError(ValueError):
    """A dataset directory is missing, partial or corrupt."""


@dataclass
class ImageSet:
    images: torch.Tensor  # [N, 3, 32, 32] uint8
    labels: torch.Tensor  # [N] int64
    num_classes: int
    mean: tuple[float, float, float]  # per-channel, on the 0..1 scale (of the training images)
    std: tuple[float, float, float]

    def __len__(self) -> int:
        return len(self.labels)


_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "labels": b"labels",
        "classes": 10,
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "labels": b"fine_labels",
        "classes": 100,
    },
}


def _cifar_root(name: str, data_dir: Path) -> Path:
    """The batches live in data_dir itself or in its standard subfolder."""
    nested = data_dir / _CIFAR[name]["folder"]
    return nested if nested.is_dir() else data_dir


def _layout(name: str) -> str:
    """The files CIFAR's python-pickle version holds, and where."""
    spec = _CIFAR[name]
    train = spec["train"][0] if len(spec["train"]) == 1 else f"{spec['train'][0]}..{spec['train'][-1]}"
    return (f"{name}'s python-pickle batches {train} and {spec['test'][0]} in --data-dir or its "
            f"{spec['folder']}/ folder, as {spec['archive']} unpacks")


def _read_batch(path: Path, label_key: bytes, num_classes: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path}: missing (expected {_layout(name)})")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = batch[b"data"], batch[label_key]
        images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(labels, dtype=torch.int64)
    except DataError:
        raise
    except Exception as error:  # unpickling garbage can raise almost anything
        raise DataError(f"{path}: not a readable CIFAR batch ({type(error).__name__}: {error})") from None
    if len(images) != len(labels) or len(labels) == 0:
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f"{path}: labels outside 0..{num_classes - 1}")
    return images, labels


def _per_channel(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())


def _cifar(name: str, data_dir: Path) -> tuple[ImageSet, ImageSet]:
    spec = _CIFAR[name]
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such directory (expected {_layout(name)})")
    root = _cifar_root(name, data_dir)
    parts = {}
    for split in ("train", "test"):
        batches = [_read_batch(root / file, spec["labels"], spec["classes"], name) for file in spec[split]]
        parts[split] = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    mean, std = _per_channel(parts["train"][0])
    return tuple(ImageSet(images, labels, spec["classes"], mean, std) for images, labels in parts.values())


def _digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[ImageSet, ImageSet]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("--data digits needs scikit-learn (pip install scikit-learn)") from None
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # [N, 1, 8, 8], 0..16
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = (images / 16 * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_count = int(len(labels) * test_fraction)
    test, train = order[:test_count], order[test_count:]
    mean, std = _per_channel(images[train])
    return ImageSet(images[train], labels[train], 10, mean, std), ImageSet(images[test], labels[test], 10, mean, std)


def load(name: str, data_dir: str | Path | None = None) -> tuple[ImageSet, ImageSet]:
    """(train, test) sets of 'cifar10', 'cifar100' (from data_dir) or 'digits'."""
    if name == "digits":
        return _digits()
    if name in _CIFAR:
        if data_dir is None:
            raise DataError(f"--data {name} needs --data-dir (the folder with the python-pickle batches)")
        return _cifar(name, Path(data_dir))
    raise DataError(f"unknown dataset {name!r}; choose cifar10, cifar100 or digits")


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """The paper's augmentation on a uint8 batch: zero-pad by `padding`, take
    a random crop of the original size, flip horizontally with probability 1/2."""
    n, channels, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(height)).view(n, 1, height, 1)
    columns = dx.view(n, 1) + torch.arange(width)
    columns = torch.where(flip.view(n, 1), columns.flip(1), columns).view(n, 1, 1, width)
    return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(channels).view(1, channels, 1, 1), rows, columns]


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [N, 3, H, W] → float, per-channel standardised."""
    mean = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std
