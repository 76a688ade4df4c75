"""Shared test set-up.

Without a CUDA device, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before any ``@triton.jit`` decorator executes, i.e. before faststeal's kernel modules import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def seed_all():
    torch.manual_seed(1234)
    return 1234
