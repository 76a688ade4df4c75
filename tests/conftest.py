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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared 2-core machine two
    intra-op threads on tiny GEMMs wait on descheduled peers and run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

