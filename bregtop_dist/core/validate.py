"""Refusing arguments of the wrong type with a message that names the argument, its value
and what is allowed. Shared by the settings (:mod:`bregtop_dist.config`) and the public
block functions (``kron_stats``, ``kron_precondition``)."""

from __future__ import annotations

import numbers
from typing import Any

import torch


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. A TypeError, and also a ValueError like every other
    refused setting, so ``except ValueError`` catches any bad setting."""


def describe_type(value: Any) -> str:
    """``None``, ``a str``, ``an int``: what a message says was given."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def is_real(value: Any) -> bool:
    """A real number (int, float, a numpy scalar), but not a bool, a str or a tensor."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int, but not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def wrong_type(name: str, value: Any, allowed: str) -> ArgumentTypeError:
    """``{name}={value!r} is not allowed: {allowed} (got a str)``, to raise."""
    return ArgumentTypeError(f"{name}={value!r} is not allowed: {allowed} (got {describe_type(value)})")


def check_floating_tensor(name: str, value: Any) -> torch.Tensor:
    """``value``, refused (ArgumentTypeError) unless it is a floating-point tensor: integer
    tensors would be truncated."""
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a floating-point torch.Tensor, got {describe_type(value)}")
    if not value.is_floating_point():
        raise ArgumentTypeError(
            f"{name} has dtype {value.dtype}; it must be a floating-point tensor "
            "(float16, bfloat16, float32 or float64)"
        )
    return value
