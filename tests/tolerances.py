"""The one table of (atol, rtol) per dtype used by every op test, and the low-precision rule."""

import torch

TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


# The flash-attention rule for bfloat16/float16 kernels: their error against a float32 reference
# is at most LOWP_FACTOR times the error of the same computation written as a PyTorch composite
# in that dtype, plus a floor (relative to the output's magnitude) for outputs the composite
# happens to get (nearly) exact.
LOWP_FACTOR = 2.0
LOWP_FLOOR = {torch.bfloat16: 2e-3, torch.float16: 2e-4}


def assert_close_lowp(actual: torch.Tensor, reference32: torch.Tensor,
                      composite: torch.Tensor, what: str = "") -> None:
    """max |actual - ref32| <= LOWP_FACTOR * max |composite - ref32| + floor * max(1, |ref32|)."""
    assert actual.shape == reference32.shape, f"{what}: shape {actual.shape} != " \
                                               f"{reference32.shape}"
    ref = reference32.detach().double().cpu()
    err = (actual.detach().double().cpu() - ref).abs().max().item()
    base = (composite.detach().double().cpu() - ref).abs().max().item()
    floor = LOWP_FLOOR[composite.dtype] * max(1.0, ref.abs().max().item())
    assert err <= LOWP_FACTOR * base + floor, (
        f"{what}: error {err:.3g} vs the float32 reference exceeds {LOWP_FACTOR} x the "
        f"{composite.dtype} composite's {base:.3g} + {floor:.3g}")


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
