"""Checks every layer uses: the integer argument check (configs, oracle, victim, methods, data,
nn) and the on/off environment switches (``FASTSTEAL_TUNE``, ``FASTSTEAL_RETAIN_CPU_MEMORY``,
``FASTSTEAL_BF16_COPIES``)."""

from __future__ import annotations

import operator
import os
from typing import Any, Optional


def positive_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False
                 ) -> Optional[int]:
    """``value`` as an int if it is one (Python or numpy integer, not bool) and >= ``minimum``.

    TypeError for a non-integer, ValueError below ``minimum``; both name the argument, what it
    must be and the value. ``allow_none``: None passes through.
    """
    if value is None and allow_none:
        return None
    what = ("a positive integer" if minimum == 1 else "a non-negative integer" if minimum == 0
            else f"an integer >= {minimum}")
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, got bool ({value!r})")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} "
                        f"({value!r})") from None
    if v < minimum:
        raise ValueError(f"{name} must be {what}, got {v}")
    return v


def env_off(name: str) -> bool:
    """Whether the on/off switch ``name`` is set to off (``0``, ``false``, ``no`` or ``off``, any
    case); unset or anything else is on."""
    return os.environ.get(name, "1").strip().lower() in ("0", "false", "no", "off")
