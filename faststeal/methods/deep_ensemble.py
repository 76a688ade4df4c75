"""Deep Ensemble (Lakshminarayanan, Pritzel & Blundell, NeurIPS 2017, "Simple and Scalable
Predictive Uncertainty Estimation using Deep Ensembles").

M networks with independent random initialisation, each trained on its own random order of the
data with a proper scoring rule; the prediction is the average of the members' softmax outputs.
Here the M members are one stack (:func:`faststeal.stack`, ``members=M``): every step
gathers an (M, B, ...) batch from M independent index orders, computes the M losses in one
batched forward and updates all members with ONE Adam step (the loss is the SUM of the members'
own mean cross-entropies, so each member gets exactly its own gradient).

Defaults and their source:
* ``members=5`` — the paper uses M = 5 for its classification experiments.
* scoring rule: negative log-likelihood (softmax cross-entropy), the paper's choice for
  classification; with soft labels (a probability-output victim) the cross-entropy to the
  victim's distribution, still a proper scoring rule.
* ``bootstrap=False`` — the paper trains every member on the whole data set (random
  initialisation and shuffling give enough diversity; it reports that bagging hurts).
  ``bootstrap=True`` draws one bootstrap resample (N rows with replacement) per member at the
  start of ``fit`` and shuffles it every epoch.
* Adversarial training (the paper's optional fast-gradient-sign smoothing) is omitted: the
  paper itself shows ensembles work without it, and the stealing study asks about member
  diversity from ordinary training.
* Adam at the ``lr`` given to :meth:`fit` (the paper uses Adam), same epochs and batch size per
  member as every other method.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from .base import Method, _check_positive_int


class DeepEnsemble(Method):
    """M independently initialised and independently shuffled networks."""

    name: ClassVar[str] = "deep-ensemble"
    DEFAULTS: ClassVar[dict[str, Any]] = {"members": 5, "bootstrap": False, "member_range": None}

    def _validate_hparams(self, hp: dict[str, Any]) -> None:
        _check_positive_int("members", hp["members"])
        if not isinstance(hp["bootstrap"], bool):
            raise ValueError(f"bootstrap must be a bool, got {hp['bootstrap']!r}")
        r = hp["member_range"]
        if r is not None:
            if (not isinstance(r, (tuple, list)) or len(r) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in r)
                    or not 0 <= r[0] < r[1] <= hp["members"]):
                raise ValueError(f"member_range must be (start, stop) with 0 <= start < stop <= "
                                 f"members={hp['members']}, got {r!r}")
            hp["member_range"] = (int(r[0]), int(r[1]))

    def _build(self) -> torch.nn.Module:
        full = self._make_stack(self._hp["members"])
        if self._hp["member_range"] is None:
            return full
        # Member sharding (faststeal.distributed): build all M members exactly as one process
        # would, keep this shard's block, so member i is the same network on every layout.
        a, b = self._hp["member_range"]
        shard = self._make_stack(b - a, init="copy")
        for i in range(a, b):
            shard.load_member(i - a, full.member(i))
        return shard

    @property
    def num_members(self) -> int:
        r = self._hp["member_range"]
        return self._hp["members"] if r is None else r[1] - r[0]

    def _data_members(self) -> int:
        # always draw the data orders of all M members, so a shard's members see the same data
        return self._hp["members"]

    def _epoch_order(self, gen: torch.Generator, n: int, s_data: int,
                     pool: Optional[Tensor]) -> Tensor:
        order = Method._epoch_order(gen, n, s_data, pool)
        r = self._hp["member_range"]
        return order if r is None else order[r[0]:r[1]]

    def _index_pool(self, gen: torch.Generator, n: int, s_data: int) -> Optional[Tensor]:
        if not self._hp["bootstrap"]:
            return None
        return torch.randint(0, n, (s_data, n), generator=gen)
