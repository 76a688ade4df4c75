"""Stacked layers: S members with a leading member axis, shape contract ``(S, B, ...)``.

:mod:`faststeal.nn.layers` holds the deterministic stacked layers (linear, conv, per-member batch
norm, dropout, pooling); :mod:`faststeal.nn.bayes` the mean-field Gaussian layers whose weight
samples play the role of members; :mod:`faststeal.nn.stack` turns any user ``nn.Module`` into S
members built from them.
"""

from .bayes import BayesConv2d, BayesLinear
from .layers import (CONV_STRATEGIES, EnsembleBatchNorm, EnsembleConv2d, EnsembleDropout,
                     EnsembleEmbedding, EnsembleLayerNorm, EnsembleLinear, EnsembleMaxPool2d,
                     ensemble_conv2d, fold_4d, next_seed, set_mc_dropout)
from .stack import StackedModule, stack, stack_from, unstack

__all__ = [
    "BayesConv2d", "BayesLinear", "CONV_STRATEGIES", "EnsembleBatchNorm", "EnsembleConv2d",
    "EnsembleDropout", "EnsembleEmbedding", "EnsembleLayerNorm", "EnsembleLinear",
    "EnsembleMaxPool2d", "StackedModule", "ensemble_conv2d", "fold_4d", "next_seed",
    "set_mc_dropout", "stack", "stack_from", "unstack",
]
