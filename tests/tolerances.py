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
