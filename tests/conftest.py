"""Shared test set-up.

Without a CUDA device, Triton kernels run under the interpreter: TRITON_INTERPRET must be set
before any ``@triton.jit`` decorator executes, i.e. before faststeal's kernel modules import.
"""

import atexit
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Measured dispatch (faststeal/ops/tuning.py) is off for the suite: every choice takes its
# documented default, so results do not depend on timings of a loaded CI machine and no test
# pays for tuning; tests/test_tuning.py turns it on where it is the subject. Any cache goes to
# a private folder, never the user's ~/.cache.
os.environ.setdefault("FASTSTEAL_TUNE", "0")
if "FASTSTEAL_TUNING_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="faststeal-tuning-")
    os.environ["FASTSTEAL_TUNING_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

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


@pytest.fixture
def poison():
    """The compiled kernels' outputs start as NaN (integers: a sentinel) for the test, so an
    element a kernel forgets to write fails instead of passing by luck."""
    from faststeal import _ext

    if _ext.C is None:
        yield
        return
    _ext.C._set_poison_outputs(True)
    yield
    _ext.C._set_poison_outputs(False)
