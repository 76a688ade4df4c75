"""Boundary checks shared by the public ops: errors name the argument, its shape, dtype, device."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, t, dims: tuple[int, ...], float_only: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got {describe(t)}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {describe(t)}")
    return t


def same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype and t.dtype.is_floating_point:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def dim_eq(name: str, t: torch.Tensor, axis: int, value: int, what: str) -> None:
    if t.shape[axis] != value:
        raise ValueError(f"{name} has {t.shape[axis]} {what} (dim {axis}, {describe(t)}), "
                         f"expected {value}")


def contiguous(name: str, t: torch.Tensor) -> torch.Tensor:
    """Dense row-major copy when needed; overlapping or zero-stride views are copied too."""
    return t if t.is_contiguous() else t.contiguous()


def seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return value


def probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def class_labels(name: str, t: torch.Tensor, num_classes: int) -> None:
    """Every label in [0, num_classes) (reads a CUDA tensor back: for metrics, not hot loops).
    One min/max reduction on the good path (it runs every training step on the CPU)."""
    if t.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one read-back
    if lo < 0 or hi >= num_classes:
        bad = (t < 0) | (t >= num_classes)
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] = {int(t[i])} is not a class index in [0, {num_classes})"
                         f" ({describe(t)})")


def positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)
