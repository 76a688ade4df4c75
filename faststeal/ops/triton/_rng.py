"""The counter-based RNG of :mod:`faststeal.ops.rng` as ``@triton.jit`` helpers.

Everything is uint32 arithmetic (multiplications wrap mod 2**32, shifts are logical), so the bits
match the reference exactly; callers pass ``counter`` and ``key`` as uint32 tensors.
"""

import triton
import triton.language as tl

# jit functions may only read constexpr globals
_TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)  # 2**-24, exact in float32
_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def fmix32(x):
    """MurmurHash3's finaliser on uint32 values."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x85EBCA6B, tl.uint32)
    x = x ^ (x >> 13)
    x = x * tl.full((), 0xC2B2AE35, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit
def random_bits(counter, key):
    """``fmix32(fmix32(counter ^ key) ^ key)``; counter and key uint32."""
    return fmix32(fmix32(counter ^ key) ^ key)


@triton.jit
def dropout_keep(counter, key, threshold):
    """Keep iff the 24-bit word ``bits >> 8`` is >= ``threshold`` (uint32); bit-identical to
    :func:`faststeal.ops.rng.dropout_keep`."""
    return (random_bits(counter, key) >> 8) >= threshold


@triton.jit
def standard_normal(index, key):
    """Box-Muller on counters ``2 index`` and ``2 index + 1`` (uint32, wrapping like the reference's
    ``& 0xFFFFFFFF``); float32. Agrees with the reference to float32 rounding of log/cos."""
    c = index * 2
    b1 = random_bits(c, key) >> 8
    b2 = random_bits(c + 1, key) >> 8
    u1 = (b1 + 1).to(tl.float32) * _TWO_POW_M24  # in (0, 1]: log(u1) is finite
    u2 = b2.to(tl.float32) * _TWO_POW_M24
    # constexpr on the right: the interpreter cannot multiply constexpr * tensor
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(u2 * _TWO_PI)
