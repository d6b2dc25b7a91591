"""argparse types that name the option and the bound in their error (``--k: must be >= 1``)."""

from __future__ import annotations

import argparse
import math


def arg_int(lo: int):
    """An argparse type: an integer >= ``lo`` (argparse then names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value

    return parse


def arg_float(lo: float, inclusive: bool = True):
    """An argparse type: a finite number >= ``lo`` (> ``lo`` when not ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (value == lo and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {lo}, got {text}")
        return value

    return parse
