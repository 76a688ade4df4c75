"""scikit-learn's ``load_digits``: 1,797 8x8 handwritten digits (values 0-16), always offline.

It ships no test split: a fixed 20% held-out test part is carved with a fixed seed, the same
for every experiment (see :func:`faststeal.data.common.carve_test`).
"""

from __future__ import annotations

import functools

import numpy as np

from .common import DatasetNotFoundError, RawSplit, carve_test

TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)  # packaged, immutable data: parse once per process
def load_digits_raw() -> tuple[RawSplit, RawSplit]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DatasetNotFoundError(
            "the 'digits' dataset needs scikit-learn: `pip install scikit-learn`") from e
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None]  # (1797, 1, 8, 8), 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    return carve_test(RawSplit(images, labels, scale=16.0), TEST_FRACTION)
