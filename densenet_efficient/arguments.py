"""Command-line argument types shared by the commands, and a parser whose
errors are one line (the argument, what was expected, what was given) and
exit with status 2."""

from __future__ import annotations

import argparse
import re
import sys

__all__ = [
    "CommandLineParser",
    "model_name",
    "non_negative_float",
    "non_negative_int",
    "parse_memory",
    "positive_float",
    "positive_int",
    "probability",
]


class CommandLineParser(argparse.ArgumentParser):
    """An ArgumentParser that reports a bad command line in one line."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _parsed(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _whole_number(text: str) -> int:
    return _parsed(text, int, "a whole number")


def positive_int(text: str) -> int:
    value = _whole_number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def _number(text: str) -> float:
    return _parsed(text, float, "a number")


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def probability(text: str) -> float:
    """A dropout probability: 0 <= p < 1."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {text}")
    return value


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'16GiB', '80 GB', '1.5TiB', '512MiB' or a byte count, as bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"memory must look like 16GiB, 80GB or 512MiB, got {text!r}")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory must be positive, got {text!r}")
    return int(value)


def model_name(text: str) -> str:
    """A model the builders know and can build (depth rules included),
    checked by building it on the meta device: nothing is allocated."""
    import torch

    from . import builders

    try:
        with torch.device("meta"):
            builders.builder(text)()
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text
