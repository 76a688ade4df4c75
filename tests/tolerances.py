"""The one table of (atol, rtol) per dtype used by every op test."""

import torch

TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOL[dtype]
    return {"atol": atol, "rtol": rtol}


def tol_scaled(dtype: torch.dtype, expected: torch.Tensor) -> dict:
    """``tol(dtype)`` with atol scaled by ``max(1, max |expected|)``.

    For outputs of long reductions (GEMM gradients, sums over a batch or over members): their
    rounding error grows with the magnitude of the summed terms, not with that of an element
    that happens to cancel to near zero, and backends legitimately sum in different orders.
    """
    atol, rtol = TOL[dtype]
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    return {"atol": atol * scale, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32,
                 what: str = "") -> None:
    """Same shape, and equal within ``tol_scaled(dtype, expected)`` (compared on the CPU)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual.cpu(), expected.cpu(), **tol_scaled(dtype, expected),
                               msg=lambda m: f"{what}: {m}")
