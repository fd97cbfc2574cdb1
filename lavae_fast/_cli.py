"""Argument types shared by the command-line tools (``type=`` of ``argparse`` options).

Each parses one value or raises ``argparse.ArgumentTypeError`` with a message that argparse prints
after the option's name (``argument --steps: must be a positive integer, got 0``).
"""

from __future__ import annotations

import argparse
import math
import re

__all__ = ["positive_int", "nonneg_int", "odd_positive_int", "positive_float", "canvas", "accept_negative_numbers"]


def _int(s) -> int:
    try:
        return int(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None


def _int_at_least(lo: int, what: str):
    def parse(s) -> int:
        v = _int(s)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v

    parse.__name__ = parse.__qualname__ = f"int_at_least_{lo}"
    return parse


positive_int = _int_at_least(1, "a positive integer")  # an integer >= 1
nonneg_int = _int_at_least(0, "a non-negative integer")  # an integer >= 0


def odd_positive_int(s) -> int:
    """An odd integer >= 1 (the counter's window: 1, 3, 5, ...)."""
    v = _int(s)
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
