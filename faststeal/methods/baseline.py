"""Single-model baseline: one network (S = 1) trained by plain maximum likelihood.

The surrogate the UQ methods are compared against ("gain over baseline" in PRODUCT.md). It is
built as a one-member stack (:func:`faststeal.stack`) so it runs through exactly the
same code (stacked layers, ``ensemble_cross_entropy``, the shared training loop) as the ensembles.

Defaults (shared by every method, for comparable budgets): Adam (Kingma & Ba 2015) at the ``lr``
given to :meth:`fit`, no weight decay, the same epochs and batch size as every other method.
No dropout: the baseline is the deterministic network the other methods put uncertainty on.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Method


class Baseline(Method):
    """One deterministic network; ``predict_members`` returns (1, B, C)."""

    name: ClassVar[str] = "baseline"
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    def _validate_hparams(self, hp: dict[str, Any]) -> None:
        pass

    def _build(self) -> torch.nn.Module:
        return self._make_stack(1)

    @property
    def num_members(self) -> int:
        return 1
