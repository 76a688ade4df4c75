"""Property-based tests (hypothesis) of the two input boundaries users hit first.

* ``Config.validate``: every valid configuration passes; one invalid field (wrong type, out of
  range, unknown name) raises ValueError/TypeError whose message names that field.
* The public ops (``ensemble_linear``, ``bayes_linear``, ``member_stats``,
  ``ensemble_cross_entropy``): a valid call with one argument spoiled (rank, shape, dtype,
  device, type, range) raises ValueError/TypeError whose message starts with that argument's
  name; valid random shapes give the same outputs under the ``cpp`` backend as under the
  ``reference`` backend.

Shapes are tiny and ``max_examples`` small, so the file runs in seconds on one thread.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from faststeal import _ext, ops
from faststeal.data import DATASETS
from faststeal.methods import METHODS
from faststeal.models import ARCHS
from faststeal.ops.reference import ACTIVATIONS
from faststeal.runs import OUTPUT_MODES, Config
from tolerances import tol_scaled

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("one_thread")


# =============================================================================== Config

pos_ints = st.integers(1, 10_000)
finite_pos = st.floats(1e-6, 1e3, allow_nan=False, allow_infinity=False)

VALID_FIELDS = {
    "dataset": st.sampled_from(list(DATASETS)),
    "pool_dataset": st.none() | st.sampled_from(list(DATASETS)),
    "victim_arch": st.sampled_from(list(ARCHS)),
    "surrogate_arch": st.sampled_from(list(ARCHS)),
    "victim_epochs": st.none() | pos_ints,
    "victim_fraction": st.floats(0.01, 0.99),
    "budget": pos_ints, "seeds": pos_ints, "epochs": pos_ints, "batch_size": pos_ints,
    "probe_size": pos_ints, "record_every": pos_ints, "sweep_seeds": pos_ints, "topk": pos_ints,
    "output_mode": st.sampled_from(OUTPUT_MODES),
    "temperature": finite_pos,
    "decimals": st.none() | st.integers(0, 8),
    "methods": st.lists(st.sampled_from(list(METHODS)), min_size=1, max_size=4, unique=True)
    | st.just("all"),
    "lr": finite_pos,
    "member_sweep": st.lists(pos_ints, max_size=4),
    # a method with a member count (the sweep varies it)
    "sweep_method": st.sampled_from([m for m, c in METHODS.items() if "members" in c.DEFAULTS]),
    "split_seed": st.integers(0, 2**31),
    "member_chunk": st.none() | st.just("auto") | pos_ints,
    "method_params": st.dictionaries(st.sampled_from(list(METHODS)), st.just({}), max_size=2),
}


@SETTINGS
@given(st.fixed_dictionaries({}, optional=VALID_FIELDS))
def test_valid_configs_pass(fields):
    Config(**fields).validate()


junk = st.one_of(st.text(max_size=4), st.booleans(), st.none(), st.lists(st.integers(), max_size=2),
                 st.floats(allow_nan=True, allow_infinity=True))
non_pos_int = st.one_of(st.integers(max_value=0), st.booleans(), st.floats(), st.text(max_size=3),
                        st.lists(st.integers(1, 3), max_size=2))
bad_real = st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf),
                     st.just(-math.inf), st.booleans(), st.text(max_size=3), st.none())
unknown_name = st.text(max_size=8).filter(
    lambda s: s not in DATASETS and s not in ARCHS and s not in OUTPUT_MODES
    and s not in METHODS) | st.integers() | st.none()

INVALID_FIELDS = {
    **{name: non_pos_int for name in ("budget", "seeds", "epochs", "batch_size", "probe_size",
                                      "record_every", "sweep_seeds", "topk")},
    "victim_epochs": st.one_of(st.integers(max_value=0), st.booleans(), st.floats(),
                               st.text(max_size=3)),
    "split_seed": st.integers(max_value=-1) | st.floats() | st.text(max_size=3),
    "decimals": st.integers(max_value=-1) | st.floats() | st.booleans() | st.text(max_size=3),
    "victim_fraction": st.floats(min_value=1.0) | st.floats(max_value=0.0) | bad_real,
    "lr": bad_real,
    "temperature": bad_real,
    "dataset": unknown_name,
    "victim_arch": unknown_name,
    "surrogate_arch": unknown_name,
    "output_mode": unknown_name,
    "sweep_method": unknown_name,
    "pool_dataset": unknown_name.filter(lambda v: v is not None),
    "methods": st.one_of(st.just([]), st.just(()), st.integers(), st.none(),
                         st.lists(unknown_name, min_size=1, max_size=2)),
    "member_sweep": st.one_of(st.integers(), st.none(),
                              st.lists(non_pos_int, min_size=1, max_size=2)),
    "member_chunk": st.one_of(st.integers(max_value=0), st.floats(), st.booleans(),
                              st.text(max_size=4).filter(lambda s: s != "auto")),
    "method_params": st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=3),
                               st.dictionaries(unknown_name.filter(lambda v: v is not None),
                                               st.just({}), min_size=1, max_size=1),
                               st.dictionaries(st.sampled_from(list(METHODS)),
                                               st.integers() | st.text(max_size=2),
                                               min_size=1, max_size=1)),
    "device": st.sampled_from(["tpu", "", "gpu", "mps", "cpu:0x"]),
}


@pytest.mark.parametrize("name", sorted(INVALID_FIELDS))
@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_invalid_field_rejected_naming_it(name, data):
    value = data.draw(INVALID_FIELDS[name], label=name)
    with pytest.raises((ValueError, TypeError)) as e:
        Config(**{name: value}).validate()
    # the method list's entries are reported as "method ... (in methods)"
    assert name in str(e.value), (name, value, str(e.value))


# =============================================================================== ops: errors

META = torch.device("meta")


def _linear_args(s, b, k, n, shared, bias):
    x = torch.randn(b, k) if shared else torch.randn(s, b, k)
    return dict(x=x, weight=torch.randn(s, n, k), bias=torch.randn(s, n) if bias else None,
                activation="relu", dropout_p=0.0, seed=0)


def _bayes_args(s, b, k, n, shared, bias):
    x = torch.randn(b, k) if shared else torch.randn(s, b, k)
    return dict(x=x, w_mu=torch.randn(n, k), w_rho=torch.full((n, k), -3.0),
                b_mu=torch.randn(n) if bias else None,
                b_rho=torch.full((n,), -3.0) if bias else None, seed=0, samples=s)


def _stats_args(s, b, k, n, shared, bias):
    return dict(logits=torch.randn(s, b, n), targets=torch.randint(0, n, (b,)) if bias else None)


def _xent_args(s, b, k, n, shared, bias):
    t = torch.randint(0, n, (b,)) if shared else torch.softmax(torch.randn(b, n), -1)
    return dict(logits=torch.randn(s, b, n), target=t)


OPS = {
    "ensemble_linear": (ops.ensemble_linear, _linear_args),
    "bayes_linear": (ops.bayes_linear, _bayes_args),
    "member_stats": (ops.member_stats, _stats_args),
    "ensemble_cross_entropy": (ops.ensemble_cross_entropy, _xent_args),
}


def _spoil_tensor(t: torch.Tensor, how: str, ref_dtype=torch.float32):
    """One bad version of tensor ``t`` (None: this spoiling does not apply)."""
    if how == "not_tensor":
        return t.tolist()
    if how == "rank_up":
        return t.unsqueeze(0).unsqueeze(0)
    if how == "rank_down":
        return t.reshape(-1)[0] if t.dim() == 1 else t.reshape(-1)
    if how == "int_dtype":
        return t.to(torch.int32) if t.dtype.is_floating_point else None
    if how == "float_dtype":  # for label tensors
        return t.double() if not t.dtype.is_floating_point else None
    if how == "other_float":
        return t.double() if t.dtype == ref_dtype else None
    if how == "meta":
        return t.to(META)
    if how == "grow_last":
        return torch.cat([t, t[..., :1]], dim=-1) if t.dim() and t.shape[-1] else None
    if how == "grow_first":
        return torch.cat([t, t[:1]], dim=0) if t.dim() and t.shape[0] else None
    raise AssertionError(how)


TENSOR_SPOILS = ["not_tensor", "rank_up", "rank_down", "int_dtype", "float_dtype", "other_float",
                 "meta", "grow_last", "grow_first"]

# Which arguments are tensors (the first one is the reference others are compared with: it is
# never moved to the meta device, the mismatch is reported on the other argument) and which
# scalar spoilings apply to the rest.
TENSOR_ARGS = {
    "ensemble_linear": ["x", "weight", "bias"],
    "bayes_linear": ["x", "w_mu", "w_rho", "b_mu", "b_rho"],
    "member_stats": ["logits", "targets"],
    "ensemble_cross_entropy": ["logits", "target"],
}
SCALAR_SPOILS = {
    "ensemble_linear": {"activation": ["tanh", "", 3, None],
                        "dropout_p": [1.0, -0.1, 2, "0.5", True, math.nan],
                        "seed": [-1, 2**63, 1.5, True, "0"]},
    "bayes_linear": {"samples": [0, -2, 1.0, True, "3"], "seed": [-1, 2**64, 0.5, False]},
    "member_stats": {},
    "ensemble_cross_entropy": {},
}


def _call(op_name, args):
    fn, _ = OPS[op_name]
    return fn(**args)


@st.composite
def spoiled_call(draw, op_name):
    s, b, k, n = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5)),
                  draw(st.integers(2, 5)))
    shared, bias = draw(st.booleans()), draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    args = OPS[op_name][1](s, b, k, n, shared, bias)
    candidates = [(a, h) for a in TENSOR_ARGS[op_name] if args.get(a) is not None
                  for h in TENSOR_SPOILS]
    candidates += [(a, v) for a, vals in SCALAR_SPOILS[op_name].items() for v in vals]
    arg, how = draw(st.sampled_from(candidates))
    if arg in TENSOR_ARGS[op_name]:
        if how in ("meta", "other_float") and arg == TENSOR_ARGS[op_name][0]:
            how = "grow_last"  # a mismatch with the reference argument is reported on the other
        bad = _spoil_tensor(args[arg], how)
        assume(bad is not None)
        args = {**args, arg: bad}
    else:
        args = {**args, arg: how}
    return op_name, arg, how, args


def _accepted(op_name, arg, how, args) -> bool:
    """Spoilings that leave a valid call (a bigger batch, more members or classes, another
    float dtype where any is accepted)."""
    x = args.get("x")
    if op_name == "ensemble_linear":
        return how == "grow_first" and ((arg == "x" and x.dim() == 2) or (
            arg == "weight" and x.dim() == 2 and args["bias"] is None))
    if op_name == "bayes_linear":
        return how == "grow_first" and arg == "x" and x.dim() == 2
    if op_name == "member_stats":
        return arg == "logits" and how in ("grow_first", "grow_last", "other_float")
    hard = not args["target"].dtype.is_floating_point
    if arg == "logits":
        return how in ("grow_first", "other_float") or (how == "grow_last" and hard)
    return arg == "target" and how == "other_float"


@pytest.mark.parametrize("op", sorted(OPS))
@SETTINGS
@given(data=st.data())
def test_ops_reject_bad_arguments_naming_them(op, data):
    op_name, arg, how, args = data.draw(spoiled_call(op))
    event(f"{arg}: {how}")
    if _accepted(op_name, arg, how, args):
        _call(op_name, args)  # must run
        return
    with pytest.raises((ValueError, TypeError)) as e:
        _call(op_name, args)
    msg = str(e.value)
    # A shape that no longer fits another argument may be reported on either of the two.
    names = set(TENSOR_ARGS[op_name]) if how in ("grow_first", "grow_last") else {arg}
    assert any(re.match(rf"^((soft|hard) )?{re.escape(a)}\b", msg) for a in names), \
        (op_name, arg, how, msg)


# =============================================================================== ops: backends

needs_cpp = pytest.mark.skipif(
    _ext.C is None, reason=f"faststeal._C is not built ({_ext.LOAD_ERROR}); {_ext.BUILD_HINT}")


def _both(fn):
    with ops.use_backend("reference"):
        ref = fn()
    with ops.use_backend("cpp"):
        got = fn()
    return ref, got


def _close(got, ref, what):
    assert got.shape == ref.shape, what
    torch.testing.assert_close(got, ref, **tol_scaled(torch.float32, ref),
                               msg=lambda m: f"{what}: {m}")


shapes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6), st.integers(1, 6))


@needs_cpp
@SETTINGS
@given(shapes, st.booleans(), st.booleans(), st.sampled_from(ACTIVATIONS),
       st.sampled_from([0.0, 0.3]), st.integers(0, 2**40))
def test_ensemble_linear_cpp_matches_reference(shape, shared, bias, activation, p, seed):
    torch.manual_seed(seed % 2**31)
    args = _linear_args(*shape, shared, bias)
    args.update(activation=activation, dropout_p=p, seed=seed)
    ref, got = _both(lambda: ops.ensemble_linear(**args))
    _close(got, ref, "ensemble_linear")


@needs_cpp
@SETTINGS
@given(shapes, st.booleans(), st.booleans(), st.integers(0, 2**40))
def test_bayes_linear_cpp_matches_reference(shape, shared, bias, seed):
    torch.manual_seed(seed % 2**31)
    args = _bayes_args(*shape, shared, bias)
    args["seed"] = seed
    ref, got = _both(lambda: ops.bayes_linear(**args))
    _close(got, ref, "bayes_linear")


@needs_cpp
@SETTINGS
@given(shapes, st.booleans(), st.integers(0, 2**31 - 1))
def test_member_stats_cpp_matches_reference(shape, with_targets, seed):
    torch.manual_seed(seed)
    args = _stats_args(*shape, False, with_targets)
    ref, got = _both(lambda: ops.member_stats(**args))
    top2 = ref.mean_probs.topk(min(2, ref.mean_probs.shape[-1]), -1).values
    clear = (top2[:, 0] - top2[:, -1] > 1e-4) | (top2.shape[-1] == 1)
    for field in ref._fields:
        r, g = getattr(ref, field), getattr(got, field)
        if field == "pred":
            assert torch.equal(r[clear], g[clear])
        elif field in ("disagreement", "correct", "member_correct"):
            if bool(clear.all()):
                _close(g, r, field)
        else:
            _close(g, r, field)


@needs_cpp
@SETTINGS
@given(shapes, st.booleans(), st.integers(0, 2**31 - 1))
def test_ensemble_cross_entropy_cpp_matches_reference(shape, hard, seed):
    torch.manual_seed(seed)
    args = _xent_args(*shape, hard, False)

    def run():
        logits = args["logits"].clone().requires_grad_(True)
        loss = ops.ensemble_cross_entropy(logits, args["target"])
        loss.sum().backward()
        return loss.detach(), logits.grad

    (ref, ref_g), (got, got_g) = _both(run)
    _close(got, ref, "loss")
    _close(got_g, ref_g, "grad")
