"""Counter-based random numbers shared by every backend.

The contract (identical in reference, C++, CUDA and Triton code):

* a 32-bit *key* is derived on the host from ``(seed, stream)`` by :func:`rng_key`;
* the random word for an element with 32-bit counter ``c`` is
  ``bits(c) = fmix32(fmix32(c ^ key) ^ key)`` where ``fmix32`` is MurmurHash3's finaliser;
* a uniform in ``[0, 1)`` is ``(bits >> 8) * 2**-24`` (24 bits, exact in float32);
* a standard normal uses Box-Muller on the pair of counters ``(2 i, 2 i + 1)``:
  ``u1 = ((bits(2i) >> 8) + 1) * 2**-24`` (in ``(0, 1]``), ``u2 = (bits(2i+1) >> 8) * 2**-24``,
  ``eps = sqrt(-2 ln u1) * cos(2 pi u2)``;
* dropout keeps an element iff ``(bits(c) >> 8) >= dropout_threshold(p)`` and scales it by
  ``1 / (1 - p)``. The comparison is on integers, so masks are bit-identical across backends;
  Gaussian samples agree to float32 rounding of ``log``/``cos``.

Streams: 0 = dropout masks of ``ensemble_linear``, 1 = weight noise and 2 = bias noise of
``bayes_linear``. Counters are the row-major linear index of the element (taken modulo 2**32), so
every member, batch row and sample has its own stream position; a forward and its backward with
the same seed regenerate the same numbers, and nothing random is stored between them.
"""

from __future__ import annotations

import math

import torch

M32 = 0xFFFFFFFF
STREAM_DROPOUT = 0
STREAM_WEIGHT = 1
STREAM_BIAS = 2


def _fmix32_int(x: int) -> int:
    x &= M32
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & M32
    x ^= x >> 16
    return x


def rng_key(seed: int, stream: int) -> int:
    """32-bit key for ``(seed, stream)``; computed on the host and passed to kernels."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0 or seed >= 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    lo, hi = seed & M32, (seed >> 32) & M32
    return _fmix32_int(_fmix32_int(lo ^ 0x9E3779B9) ^ _fmix32_int(hi + 0x632BE5AB) ^
                       ((stream * 0x85EBCA77) & M32))


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for x in [0, 2**32) held in int64, without overflowing int64:
    # split x into 16-bit halves so every partial product stays below 2**48.
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & M32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 finaliser on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    x = x ^ (x >> 16)
    return x


def random_bits(key: int, counter: torch.Tensor) -> torch.Tensor:
    """uint32 random words (as int64) for int64 ``counter`` values."""
    c = counter.to(torch.int64) & M32
    return fmix32(fmix32(c ^ key) ^ key)


def uniform(key: int, counter: torch.Tensor) -> torch.Tensor:
    return (random_bits(key, counter) >> 8).to(torch.float32) * (2.0**-24)


def normal(key: int, index: torch.Tensor) -> torch.Tensor:
    """Standard normals for int64 element indices (Box-Muller on counters 2i, 2i+1)."""
    i = index.to(torch.int64)
    u1 = ((random_bits(key, 2 * i) >> 8) + 1).to(torch.float32) * (2.0**-24)
    u2 = (random_bits(key, 2 * i + 1) >> 8).to(torch.float32) * (2.0**-24)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def dropout_threshold(p: float) -> int:
    """Integer threshold on the 24-bit uniform: keep iff ``bits >> 8 >= threshold``."""
    return min(int(p * 16777216.0), 16777216)


def dropout_keep(key: int, counter: torch.Tensor, p: float) -> torch.Tensor:
    return (random_bits(key, counter) >> 8) >= dropout_threshold(p)
