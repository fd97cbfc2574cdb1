"""Argument types shared by the command-line tools (``type=`` of ``argparse`` options).

Each parses one value or raises ``argparse.ArgumentTypeError`` with a message that argparse prints
after the option's name (``argument --steps: must be a positive integer, got 0``).
"""

from __future__ import annotations

import argparse
import math
import re

__all__ = ["positive_int", "nonneg_int", "int_in", "batch_size", "channels", "importance_samples", "odd_positive_int", "positive_float", "canvas", "accept_negative_numbers"]


def _int(s) -> int:
    try:
        return int(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None


# The largest integer any option takes: torch's dispatcher and numpy's seeds take int64, and every
# count below it is far beyond what a machine holds; a larger value is refused here rather than
# overflowing deep in the work.
INT_MAX = 2**62


def _int_at_least(lo: int, what: str, hi: int = INT_MAX, why: str = ""):
    def parse(s) -> int:
        v = _int(s)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi}{why}, got {s}")
        return v

    parse.__name__ = parse.__qualname__ = f"int_at_least_{lo}"
    return parse


def int_in(lo: int, hi: int, why: str = ""):
    """An option type: an integer in [lo, hi]; ``why`` says what the upper bound protects."""
    return _int_at_least(lo, "a positive integer" if lo == 1 else f"an integer >= {lo}", hi, why)


positive_int = _int_at_least(1, "a positive integer")  # an integer >= 1
nonneg_int = _int_at_least(0, "a non-negative integer")  # an integer >= 0
# Sizes whose memory grows with the value: a batch of images, a net's channels, importance samples.
batch_size = int_in(1, 2**16, " (images in one batch)")
channels = int_in(1, 2**12, " (channels of a net)")
importance_samples = int_in(0, 10**5, " (importance samples per image; 100 is the paper's)")


def odd_positive_int(s) -> int:
    """An odd integer >= 1 (the counter's window: 1, 3, 5, ...)."""
    v = _int(s)
    if v > INT_MAX:
        raise argparse.ArgumentTypeError(f"must be at most {INT_MAX}, got {s}")
    if v < 1 or v % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be an odd positive integer (1, 3, 5, ...), got {s}")
    return v


def positive_float(s) -> float:
    """A finite number > 0."""
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s}")
    return v


def canvas(s):
    """``N`` or ``HxW`` → (H, W), by :func:`lavae_fast.data.parse_canvas` (the one canvas parser)."""
    from .data.generator import parse_canvas

    try:
        return parse_canvas(s)
    except (TypeError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e).replace("canvas: ", "")) from None


def accept_negative_numbers(p: argparse.ArgumentParser) -> None:
    """Let ``--lr -1e-3`` reach the option's validator (which refuses it with its own message):
    argparse takes only ``-N`` and ``-N.N`` for numbers, and would read ``-1e-3`` as an unknown
    flag. Safe for a parser none of whose options looks like a number."""
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-(?:inf|nan)$",
                                                re.IGNORECASE)
