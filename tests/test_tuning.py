"""Measured dispatch (faststeal/ops/tuning.py): each forced choice matches the reference, the
decision is cached (in memory and on disk) and used without tuning again, a corrupt cache is
ignored with a warning, FASTSTEAL_TUNE=0 gives the documented defaults, bad forcing values raise."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from faststeal import _ext, ops
from faststeal.nn import EnsembleConv2d
from faststeal.nn.layers import default_conv_strategy, ensemble_conv2d
from faststeal.ops import conv_direct, dispatch, tuning
from faststeal.ops.cpp_backend import GEMM_PATHS
from tolerances import assert_close

CPP_PATHS = tuple(f"cpp:{p}" for p in GEMM_PATHS)  # the cpp backend's tuned variants

needs_ext = pytest.mark.skipif(_ext.C is None, reason=f"faststeal._C is not built "
                                                      f"({_ext.LOAD_ERROR})")


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    """Tuning on, a private cache folder, nothing remembered from earlier tests."""
    monkeypatch.setenv("FASTSTEAL_TUNE", "1")
    monkeypatch.setenv("FASTSTEAL_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "BUDGET_S", 0.01)  # tiny shapes: keep the test fast
    tuning.clear()
    yield tmp_path
    tuning.clear()


def _linear_call(shared: bool = False, activation: str = "relu"):
    torch.manual_seed(0)
    x = torch.randn(5, 12, 70) if not shared else torch.randn(12, 70)
    w = torch.randn(5, 33, 70, requires_grad=True)
    b = torch.randn(5, 33, requires_grad=True)
    return x, w, b, activation


@needs_ext
def test_decision_is_measured_once_and_read_from_the_cache(tuned):
    x, w, b, act = _linear_call()
    before = tuning.tunings_run
    y = ops.ensemble_linear(x, w, b, act)
    y.sum().backward()
    assert tuning.tunings_run == before + 2  # forward and backward each measured once
    (path,) = [p for p in os.listdir(tuned) if p.endswith(".json")]
    saved = json.loads((tuned / path).read_text())["decisions"]
    fwd = [v for k, v in saved.items() if k.startswith("ensemble_linear.fwd|cpu:")]
    # every path but cpp:upcast, which is cpp:bmm for float32 inputs (not timed twice)
    assert len(fwd) == 1 and set(fwd[0]["times_ms"]) == {*CPP_PATHS, "reference"} - \
        {"cpp:upcast"}
    assert fwd[0]["choice"] in fwd[0]["times_ms"]
    ops.ensemble_linear(x, w, b, act).sum().backward()  # same process: memory
    tuning.clear()  # a new process: the file
    y2 = ops.ensemble_linear(x, w, b, act)
    y2.sum().backward()
    assert tuning.tunings_run == before + 2
    assert_close(y2, y, what="y after reading the cache")
    # a partial batch of the same power-of-two class shares the decision
    ops.ensemble_linear(x[:, :10], w, b, act)
    assert tuning.tunings_run == before + 2


@needs_ext
def test_bfloat16_decision_times_the_upcast_path(tuned):
    # bfloat16 inputs: cpp:upcast is timed; cpp:onednn only where this CPU's oneDNN multiplies
    # bfloat16 (elsewhere it would run cpp:bmm's GEMM again)
    x, w, b, act = _linear_call()
    xb, wb, bb = x.bfloat16(), w.detach().bfloat16(), b.detach().bfloat16()
    fn = dispatch.impl("ensemble_linear", "fwd", "cpu")
    choice = fn.choose(xb, wb, bb, act, 0.0, 0)
    (dec,) = [v for k, v in tuning.decisions().items()
              if k.startswith("ensemble_linear.fwd|") and k.endswith(":bfloat16,relu,False")]
    want = {*CPP_PATHS, "reference"}
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        want.discard("cpp:onednn")
    assert set(dec["times_ms"]) == want and choice == dec["choice"]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_input_backward_times_one_mm_path(tuned, dtype):
    # a shared (2-D) input's backward runs the same torch.mm on onednn/bmm/mm/packed: cpp:bmm
    # stands for them (plus cpp:upcast for bfloat16, which multiplies as float32)
    x, w, b, act = _linear_call(shared=True)
    x, w, b = x.to(dtype), w.detach().to(dtype), b.detach().to(dtype)
    y, z = ops.reference.ensemble_linear_fwd(x, w, b, act, 0.0, 0)
    dispatch.impl("ensemble_linear", "bwd", "cpu").choose(torch.ones_like(y), x, w, b, y, z,
                                                          act, 0.0, 0, True)
    (dec,) = [v for k, v in tuning.decisions().items() if k.startswith("ensemble_linear.bwd")]
    want = {"cpp:bmm", "reference"} | ({"cpp:upcast"} if dtype == torch.bfloat16 else set())
    assert set(dec["times_ms"]) == want


@needs_ext
def test_a_forced_gemm_path_is_timed_where_it_repeats_another(tuned, monkeypatch):
    # FASTSTEAL_CPU_GEMM=upcast under auto with float32 inputs (where cpp:upcast is cpp:bmm):
    # the forced path stays a candidate beside the reference, it is not dropped
    monkeypatch.setenv("FASTSTEAL_CPU_GEMM", "upcast")
    x, w, b, act = _linear_call()
    dispatch.impl("ensemble_linear", "fwd", "cpu").choose(x, w.detach(), b.detach(), act, 0.0,
                                                          0)
    (dec,) = [v for k, v in tuning.decisions().items() if k.startswith("ensemble_linear.fwd")]
    assert set(dec["times_ms"]) == {"cpp:upcast", "reference"}


@needs_ext
def test_corrupt_cache_is_ignored_with_a_warning(tuned):
    path = tuning.cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("{not json")
    x, w, b, act = _linear_call()
    before = tuning.tunings_run
    with pytest.warns(RuntimeWarning, match="ignoring the corrupt tuning cache"):
        y = ops.ensemble_linear(x, w, b, act)
    assert tuning.tunings_run == before + 1  # measured again ...
    assert "decisions" in json.loads(open(path).read())  # ... and the file rewritten
    assert_close(y, ops.reference.ensemble_linear_fwd(x, w, b, act, 0.0, 0)[0])


def test_decision_cached_among_other_candidates_is_measured_again(tuned):
    # a cache written before a candidate existed (an older faststeal: the conv strategies before
    # 'direct') must not pin the old winner
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 6, 6)
    w = torch.randn(3, 4, 2, 3, 3)
    ensemble_conv2d(x, w, None, (1, 1), (0, 0))
    path = tuning.cache_path()
    data = json.loads(open(path).read())
    (key,) = [k for k in data["decisions"] if k.startswith("ensemble_conv2d|")]
    data["decisions"][key] = {"choice": "grouped", "times_ms": {"grouped": 1.0},
                              "default": False}  # no "names": written by the older version
    with open(path, "w") as f:
        json.dump(data, f)
    tuning.clear()
    before = tuning.tunings_run
    ensemble_conv2d(x, w, None, (1, 1), (0, 0))
    assert tuning.tunings_run == before + 1
    assert tuning.decisions()[key]["names"] == ["grouped", "unfold", "loop", "direct"]
    ensemble_conv2d(x, w, None, (1, 1), (0, 0))  # now current: read, not measured
    assert tuning.tunings_run == before + 1


def test_tuning_off_takes_the_documented_default(monkeypatch):
    monkeypatch.setenv("FASTSTEAL_TUNE", "0")
    tuning.clear()
    x, w, b, act = _linear_call()
    before = tuning.tunings_run
    fn = dispatch.impl("ensemble_linear", "fwd", "cpu")
    want = "cpp" if _ext.C is not None else "reference"
    assert fn.choose(x, w, b, act, 0.0, 0) == want
    assert tuning.tunings_run == before
    assert default_conv_strategy(torch.randn(2, 3, 1, 8, 8)) == "loop"
    assert default_conv_strategy(torch.randn(3, 1, 8, 8)) == "grouped"


@needs_ext
@pytest.mark.parametrize("path", list(GEMM_PATHS))
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_forced_gemm_path_runs_and_matches_reference(monkeypatch, path, shared):
    monkeypatch.setenv("FASTSTEAL_CPU_GEMM", path)
    monkeypatch.setenv("FASTSTEAL_TUNE", "1")
    x, w, b, act = _linear_call(shared)
    fn = dispatch.impl("ensemble_linear", "fwd", "cpu")
    with ops.use_backend("cpp"):
        assert dispatch.impl("ensemble_linear", "fwd", "cpu").choose(x, w, b, act, 0.0, 0) == \
            f"cpp:{path}"
        y = ops.ensemble_linear(x, w, b, act)
        gw, gb = torch.autograd.grad(y.square().sum(), (w, b))
    assert fn is not None
    wr, br = w.detach().requires_grad_(), b.detach().requires_grad_()
    y_ref = ops.reference.ensemble_linear(x, wr, br, act, 0.0, 0)[0]
    gw_ref, gb_ref = torch.autograd.grad(y_ref.square().sum(), (wr, br))
    assert_close(y, y_ref, what="y")
    assert_close(gw, gw_ref, what="dweight")
    assert_close(gb, gb_ref, what="dbias")


@pytest.mark.parametrize("strategy", ["grouped", "unfold", "loop"])
@pytest.mark.parametrize("shared", [False, True], ids=["stacked", "shared"])
def test_forced_conv_strategy_matches_per_member_conv(monkeypatch, strategy, shared):
    monkeypatch.setenv("FASTSTEAL_CONV_STRATEGY", strategy)
    monkeypatch.setenv("FASTSTEAL_TUNE", "1")
    torch.manual_seed(0)
    conv = EnsembleConv2d(3, 2, 4, 3, padding=1)
    x = torch.randn(5, 2, 7, 7) if shared else torch.randn(3, 5, 2, 7, 7)
    before = tuning.tunings_run
    y = conv(x)
    assert tuning.tunings_run == before  # forced: nothing measured
    for s in range(3):
        ref = F.conv2d(x if shared else x[s], conv.weight[s], conv.bias[s], 1, 1)
        assert_close(y[s], ref, what=f"member {s}")


def test_conv_auto_measures_the_strategies_once(tuned):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 6, 6)
    w = torch.randn(3, 4, 2, 3, 3, requires_grad=True)
    before = tuning.tunings_run
    y = ensemble_conv2d(x, w, None, (1, 1), (0, 0))
    y.sum().backward()  # the caller's graph is intact after the timing runs
    assert w.grad is not None and w.grad.shape == w.shape
    assert tuning.tunings_run == before + 1
    ensemble_conv2d(x, w, None, (1, 1), (0, 0))
    assert tuning.tunings_run == before + 1
    (d,) = [v for k, v in tuning.decisions().items() if k.startswith("ensemble_conv2d|")]
    # 'direct' is timed where it can run (float32, stride 1, an AVX2/AVX-512 CPU)
    assert set(d["times_ms"]) == {"grouped", "unfold", "loop"} | \
        ({"direct"} if conv_direct.isa() else set())
    assert d["names"] == ["grouped", "unfold", "loop", "direct"]


@pytest.mark.parametrize("dilation,groups", [((2, 2), 1), ((1, 1), 2)])
def test_conv_auto_times_a_dilated_or_grouped_conv_as_itself(tuned, dilation, groups):
    # was: timed as a plain conv under the plain conv's key, so 'unfold' (which cannot run a
    # dilated/grouped conv) could be chosen and raise, and grouped candidates all failed
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, 9, 9)
    w = torch.randn(3, 6, 4 // groups, 3, 3, requires_grad=True)
    b = torch.randn(3, 6)
    y = ensemble_conv2d(x, w, b, (1, 1), (1, 1), "auto", dilation, groups)
    ref = torch.stack([F.conv2d(x[s], w[s], b[s], 1, 1, dilation, groups) for s in range(3)])
    torch.testing.assert_close(y, ref)
    (d,) = [v for k, v in tuning.decisions().items() if k.startswith("ensemble_conv2d|")]
    assert set(d["times_ms"]) == {"grouped", "loop"} and not d["default"]
    assert all(t is not None for t in d["times_ms"].values())  # each candidate ran
    assert f"groups={groups}" in next(k for k in tuning.decisions() if "ensemble_conv2d" in k)


def test_bad_forcing_values_raise(monkeypatch):
    monkeypatch.setenv("FASTSTEAL_CONV_STRATEGY", "fastest")
    monkeypatch.setenv("FASTSTEAL_TUNE", "1")
    conv = EnsembleConv2d(2, 1, 2, 3)
    with pytest.raises(ValueError, match="FASTSTEAL_CONV_STRATEGY must be 'auto' or one of"):
        conv(torch.randn(2, 3, 1, 5, 5))
    if _ext.C is not None:
        from faststeal.ops import cpp_backend

        monkeypatch.setenv("FASTSTEAL_CPU_GEMM", "blas")
        with pytest.raises(ValueError, match="FASTSTEAL_CPU_GEMM must be 'auto' or one of"):
            cpp_backend.variants("ensemble_linear", "fwd")


@needs_ext
def test_info_prints_the_decisions_and_alternatives(tuned, capsys):
    from faststeal.cli import main

    x, w, b, act = _linear_call()
    ops.ensemble_linear(x, w, b, act)
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "tuning                   on" in out
    line = [ln for ln in out.splitlines() if ln.strip().startswith("ensemble_linear.fwd")]
    assert len(line) == 1 and "->" in line[0]
    for cand in (*CPP_PATHS, "reference"):
        assert (cand in line[0]) == (cand != "cpp:upcast")  # float32: upcast is cpp:bmm


@needs_ext
def test_a_requested_backend_does_not_share_auto_decisions(tuned):
    # a decision measured among cpp's GEMM paths only must not stand in for auto's (which also
    # measures the reference), and the other way round
    x, w, b, act = _linear_call()
    with ops.use_backend("cpp"):
        ops.ensemble_linear(x, w, b, act)
    before = tuning.tunings_run
    ops.ensemble_linear(x, w, b, act)
    assert tuning.tunings_run == before + 1
    fwd = {k.split("|")[0]: v for k, v in tuning.decisions().items()
           if k.startswith("ensemble_linear.fwd")}
    assert "reference" in fwd["ensemble_linear.fwd"]["times_ms"]
    assert "reference" not in fwd[f"ensemble_linear.fwd[{','.join(CPP_PATHS)}]"]["times_ms"]
