"""Host-side helpers shared by the Triton launchers, and the small ``@triton.jit`` math helpers."""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Kernels are decorated at import, so what counts is TRITON_INTERPRET at that moment.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to True: outputs are then allocated full of NaN (or -1 for integers) so an
# element a kernel fails to write shows up. Off by default: poisoning costs a fill per output.
POISON = False

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)



def acc_tl(dtype: torch.dtype):
    """Accumulation dtype inside kernels: float64 for float64 data, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton {op}: {name} must be float32/float16/bfloat16/float64, got "
                        f"dtype {t.dtype} (shape {tuple(t.shape)}, device {t.device})")


def check_device(op: str, *named: tuple[str, torch.Tensor]) -> None:
    """Every tensor on one device, and that device runnable: CUDA, or CPU under the interpreter."""
    dev = named[0][1].device
    for name, t in named:
        if t is None:
            continue
        if t.device != dev:
            raise ValueError(f"triton {op}: {name} is on {t.device} but {named[0][0]} is on {dev}")
    if dev.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"triton {op}: CPU tensors need TRITON_INTERPRET=1 set before "
                           "faststeal.ops.triton is imported (tests only)")
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"triton {op}: unsupported device {dev}")


def device_ctx(t: torch.Tensor):
    """Launch on the tensor's GPU (Triton uses the current device's stream)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def key_arg(key: int) -> int:
    """uint32 key as the int32 with the same bits: kernels bitcast it back to uint32."""
    key &= 0xFFFFFFFF
    return key - (1 << 32) if key >= (1 << 31) else key


def f32(v: float) -> float:
    """``v`` rounded to float32: what a float kernel argument holds on the GPU (the interpreter
    would keep the double), and what the reference's float32 dropout scale holds."""
    return torch.tensor(float(v), dtype=torch.float32).item()


def np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def clamp_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, np2(n)))


@triton.jit
def tile_offsets(pid, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row and column offsets of tile ``pid`` in a grid of BLOCK_R x BLOCK_C tiles over a matrix
    with C columns, tiles numbered row-major (the 1-D launch grid of the GEMM kernels)."""
    tiles_c = tl.cdiv(C, BLOCK_C)
    offs_r = (pid // tiles_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % tiles_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_r, offs_c


@triton.jit
def log1p(u):
    """Accurate log(1 + u) for u >= 0 without a log1p instruction (not in Triton's core math):
    log(w) * u / (w - 1) with w = 1 + u cancels the rounding of w (Goldberg 1991)."""
    w = 1.0 + u
    d = w - 1.0
    return tl.where(d == 0.0, u, tl.log(w) * (u / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def softplus(r):
    """torch's softplus with threshold 20: r if r > 20 else log1p(exp(r)). NaN stays NaN
    (tl.minimum(nan, 20) is 20 on GPUs and in the interpreter, so the clamp is a tl.where)."""
    return tl.where(r > 20.0, r, log1p(tl.exp(tl.where(r > 20.0, 20.0, r))))
