"""faststeal.stack: any nn.Module as S stacked members == S plain copies run in a loop."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import faststeal
from faststeal import _ext
from faststeal.nn import set_mc_dropout
from faststeal.nn.stack import StackedModule, stack, stack_from, unstack
from faststeal.ops import use_backend

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["reference"] + (["cpp"] if _ext.C is not None else [])
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


class FunctionalCNN(nn.Module):
    """A paper-style thief CNN written with F calls and view(x.size(0), -1)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 8, 3, bias=False, dilation=2, padding=2)
        self.conv3 = nn.Conv2d(8, 8, 3, padding="same", groups=2)
        self.fc1 = nn.Linear(8 * 7 * 7, 32)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x + self.conv3(x), 2)  # residual addition on the folded batch
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


class TabularMLP(nn.Module):
    def __init__(self, features: int = 7, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU())
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        return self.head(torch.cat([self.net(x)[:, :8], self.net[0](x)[:, 8:]], dim=1))


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 4)

    def forward(self, idx):
        return self.out(self.norm(self.emb(idx)).mean(1))


def _loop(members, x, train):
    for m in members:
        m.train(train)
    return torch.stack([m(x) for m in members])


def _check_equal(stacked, members, x, train, atol=1e-5):
    stacked.train(train)
    y = stacked(x)
    ref = _loop(members, x, train)
    torch.testing.assert_close(y, ref, atol=atol, rtol=1e-4)
    (y.float() ** 2).sum().backward()
    (ref.float() ** 2).sum().backward()
    for name, p in stacked.named_parameters():
        if p.grad is None:
            continue
        key = name.removeprefix("body.")
        if ".copies." in key:  # a vmap group: copies.<i>.<param>
            continue
        g = torch.stack([m.get_parameter(key).grad for m in members])
        torch.testing.assert_close(p.grad, g, atol=atol * 10, rtol=1e-3, msg=name)


def _fresh(stacked):
    return [m.train(stacked.training) for m in unstack(stacked)]


@pytest.mark.parametrize("backend", BACKENDS[-1:])  # the backend only serves the fc layer here
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_resnet18_matches_loop(backend, layout, monkeypatch):
    tv = pytest.importorskip("torchvision")
    monkeypatch.setenv("FASTSTEAL_STACK_LAYOUT", layout)
    torch.manual_seed(0)
    st = stack(lambda: tv.models.resnet18(num_classes=10), 2, seed=3, input_shape=(3, 32, 32))
    assert len(st.channels_last_convs) == 20  # every conv feeds a batch norm
    members = _fresh(st)
    x = torch.randn(3, 3, 32, 32)
    with use_backend(backend):
        _check_equal(st, members, x, train=True, atol=2e-4)  # BatchNorm on batch statistics
        # running statistics were updated identically: eval mode agrees too
        with torch.no_grad():
            torch.testing.assert_close(st.eval()(x), _loop(members, x, False), atol=2e-4,
                                       rtol=1e-4)
    assert torch.equal(st.body.bn1.running_mean[1], members[1].bn1.running_mean)


@pytest.mark.parametrize("backend", BACKENDS + (["triton"] if TRITON else []))
@pytest.mark.parametrize("model, x", [
    (FunctionalCNN, torch.randn(4, 1, 28, 28)),
    (TabularMLP, torch.randn(5, 7)),
])
def test_user_models_match_loop(backend, model, x):
    torch.manual_seed(1)
    st = stack(model, 3, seed=0, input_shape=tuple(x.shape[1:]))
    members = _fresh(st)
    with use_backend(backend):
        _check_equal(st, members, x, train=False)
        st2 = stack_from(_fresh(st), input_shape=tuple(x.shape[1:]))
        members2 = _fresh(st2)
        # train mode: BatchNorm statistics per member; no dropout randomness in the comparison
        for m in [st2, *members2]:
            for d in m.modules():
                if isinstance(d, nn.Dropout) or type(d).__name__ == "_Dropout":
                    d.p = 0.0
        _check_equal(st2, members2, x, train=True)


class PoolCNN(nn.Module):
    """nn.MaxPool2d modules: 2x2 (swapped for the fast pooling), 3x3 stride 2 with padding and
    2x2 ceil mode (kept: the fast op covers non-overlapping floor-mode windows only); nn.ReLU
    modules: one that only feeds a fast pool (fused into it), one that also feeds the output,
    one before a kept pool, and a fast pool after F.relu (nothing to fuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.p1, self.p2 = nn.MaxPool2d(2), nn.MaxPool2d(3, stride=2, padding=1)
        self.p3, self.p4 = nn.MaxPool2d(2, ceil_mode=True), nn.MaxPool2d(2)
        self.a1, self.a2, self.a3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(4 * 2 * 2 + 2, 3)

    def forward(self, x):
        x = self.p2(self.p1(self.a1(self.c1(x))))
        h = self.a2(self.c2(x))
        y = torch.flatten(self.p3(self.a3(h + 1)), 1)
        z = torch.flatten(self.p4(F.relu(h).mean(1, keepdim=True)), 1)  # a2's output read 3x
        return self.fc(torch.cat([y, z], 1))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_pool_modules_swapped_only_where_the_fast_op_applies(monkeypatch, layout):
    from faststeal.nn import EnsembleMaxPool2d
    monkeypatch.setenv("FASTSTEAL_STACK_LAYOUT", layout)
    torch.manual_seed(2)
    st = stack(PoolCNN, 3, seed=1, input_shape=(1, 15, 13))
    assert type(st.body.p1) is EnsembleMaxPool2d and st.body.p1.kernel_size == (2, 2)
    assert type(st.body.p4) is EnsembleMaxPool2d
    assert type(st.body.p2) is nn.MaxPool2d and type(st.body.p3) is nn.MaxPool2d
    # only a1 feeds a fast pool alone: fused into p1 (relu on the pooled quarter)
    assert st.fused_relu_pools == ["p1"] and st.body.p1.relu and not st.body.p4.relu
    assert type(st.body.a1) is nn.Identity
    assert type(st.body.a2) is nn.ReLU and type(st.body.a3) is nn.ReLU
    x = torch.randn(5, 1, 15, 13)  # odd sizes: floor mode drops a row / column
    with use_backend(BACKENDS[-1]):
        _check_equal(st, _fresh(st), x, train=True, atol=1e-5)
    hooked = PoolCNN()
    hooked.a1.register_forward_hook(lambda *a: None)
    assert stack(hooked, 2, seed=0, input_shape=(1, 15, 13)).fused_relu_pools == []


class PoolGuards(nn.Module):
    """ReLU modules the fold must keep: an inplace one (it writes its input, which is read again),
    one whose input another reader sees, and one that reads a view changed in place later (the
    fused pool would have saved it); pools written as MaxPool2d((2, 2)) and MaxPool2d(2,
    stride=2) (swapped), and a pool over a 3-D (batch, H, W) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.c3 = nn.Conv2d(1, 4, 3, padding=1)
        self.a1, self.a2, self.a3 = nn.ReLU(inplace=True), nn.ReLU(), nn.ReLU()
        self.p1, self.p2, self.p3 = nn.MaxPool2d((2, 2)), nn.MaxPool2d(2, stride=2), nn.MaxPool2d(2)
        self.p4 = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4 * 2 + 4 * 4 + 2 * 4 * 4 + 3, 3)

    def forward(self, x):
        h1, h2, h3 = self.c1(x), self.c2(x), self.c3(x)
        a = self.p1(self.a1(h1))  # h1 is relu'd in place, then read again below
        b = self.p2(self.a2(h2))
        c = self.p3(x[:, 0])  # (batch, 8, 8) -> (batch, 4, 4)
        d = self.p4(self.a3(h3[:, :2]))  # the ReLU alone reads the view ...
        h3 = h3.mul_(2)  # ... which changes in place afterwards
        extra = torch.stack([h1.mean((1, 2, 3)), h2.mean((1, 2, 3)), h3.mean((1, 2, 3))], 1)
        return self.fc(torch.cat([a.flatten(1), b.flatten(1), c.flatten(1), d.flatten(1), extra],
                                 1))


def test_relu_pool_fold_keeps_relus_it_cannot_prove():
    from faststeal.nn import EnsembleMaxPool2d
    torch.manual_seed(3)
    st = stack(PoolGuards, 2, seed=2, input_shape=(1, 8, 8))
    assert all(type(getattr(st.body, p)) is EnsembleMaxPool2d for p in ("p1", "p2", "p3", "p4"))
    assert st.fused_relu_pools == []
    assert all(type(getattr(st.body, a)) is nn.ReLU for a in ("a1", "a2", "a3"))
    x = torch.randn(5, 1, 8, 8)
    with use_backend(BACKENDS[-1]):
        _check_equal(st, _fresh(st), x, train=True, atol=1e-5)


def test_ensemble_max_pool_relu_on_every_path():
    from faststeal.nn import EnsembleMaxPool2d
    x = torch.randn(3, 4, 2, 9, 8)  # (S, B, C, H, W)
    for kernel, stride in ((2, None), (3, 2)):  # the op; F.max_pool2d (overlapping windows)
        pool = EnsembleMaxPool2d(kernel, stride, relu=True)
        want = torch.stack([F.max_pool2d(m.relu(), kernel, stride) for m in x])
        torch.testing.assert_close(pool(x), want, rtol=0, atol=0)
        torch.testing.assert_close(pool(x[0]), want[0], rtol=0, atol=0)
        torch.testing.assert_close(pool(x[0, :, 0]), F.max_pool2d(x[0, :, 0].relu(), kernel,
                                                                  stride), rtol=0, atol=0)


class SharedReLU(nn.Module):
    """One nn.ReLU module applied after two layers (as torchvision's ResNet does)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 16), nn.Linear(16, 8), nn.Linear(8, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


class TrainOnlyNoise(nn.Module):
    """Between fc and act only in training: the eval graph alone would allow a fusion."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc(x)
        if self.training:
            h = h - 0.5
        return self.head(self.act(h))


class EvalOnlyShift(TrainOnlyNoise):
    """The same with the extra code in eval mode only: the train graph alone would fuse."""

    def forward(self, x):
        h = self.fc(x)
        if not self.training:
            h = h - 0.5
        return self.head(self.act(h))


@pytest.mark.parametrize("backend", BACKENDS + (["triton"] if TRITON else []))
def test_linear_relu_fused_only_where_the_graph_proves_it(backend):
    from faststeal.nn.stack import _Linear

    seq = lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8),  # noqa: E731
                                nn.ReLU(inplace=True), nn.Linear(8, 3), nn.ReLU())
    x = torch.randn(5, 12)
    for factory, want in [(seq, {"0": "relu", "2": "relu", "4": "none"}),  # not the head
                          (SharedReLU, {"fc1": "none", "fc2": "none", "head": "none"})]:
        torch.manual_seed(2)
        st = stack(factory, 3, seed=1, input_shape=(12,))
        got = {n.removeprefix("body."): m.activation for n, m in st.named_modules()
               if isinstance(m, _Linear)}
        assert got == want
        assert st.fused_relus == sorted(k for k, v in want.items() if v == "relu")
        fused = [k for k, v in want.items() if v == "relu"]
        assert all(type(st.body.get_submodule(str(int(k) + 1))) is nn.Identity for k in fused)
        members = _fresh(st)
        with use_backend(backend):
            _check_equal(st, members, x, train=True)
    members = _fresh(stack(seq, 2, seed=0, input_shape=(12,)))
    assert all(type(m[1]) is nn.ReLU for m in members)  # the plain members keep their ReLU
    # no fusion where a mode's graph puts code between the two, or where a hook could observe
    # the pre-activation; the stacked model still matches the loop
    for model in (TrainOnlyNoise, EvalOnlyShift):
        st = stack(model, 2, seed=0, input_shape=(12,))
        assert st.fused_relus == [] and type(st.body.act) is nn.ReLU
        with use_backend(backend):
            _check_equal(st, _fresh(st), x, train=True)
            with torch.no_grad():
                torch.testing.assert_close(st.eval()(x), _loop(_fresh(st), x, False))
    # tracing in both modes leaves each of the user's modules in its own mode
    mixed = [seq() for _ in range(2)]
    for m in mixed:
        m[2].eval()
    stack_from(mixed, input_shape=(12,))
    assert [[c.training for c in m] for m in mixed] == [[True, True, False, True, True, True]] * 2
    hooked = seq()
    hooked[3].register_forward_hook(lambda m, i, o: None)
    assert stack(hooked, 2, seed=0, input_shape=(12,)).fused_relus == []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert stack(seq, 2, seed=0, input_shape=(12,)).fused_relus == []
    finally:
        handle.remove()
    assert stack(seq, 2, seed=0, input_shape=(12,), last_layer="2").fused_relus == ["0", "4"]


class ConvBNOut(nn.Module):
    """conv -> batch norm -> relu -> pool -> conv whose feature map is the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.drop = nn.Conv2d(4, 3, 3), nn.Dropout(0.5)

    def forward(self, x):
        return self.conv2(self.drop(F.avg_pool2d(F.relu(self.bn(self.conv1(x))), 2)))


def _conv_layouts(st, x):
    """Per stacked conv: whether its output in this call was channels-last (and not NCHW).
    Wraps the layers' forward (a module hook would itself make the stack run NCHW)."""
    seen = {}
    convs = {n: m for n, m in st.body.named_modules() if type(m).__name__ == "_Conv2d"}

    def wrap(name, fwd):
        def forward(inp):
            out = fwd(inp)
            seen[name] = not out.is_contiguous() and out.is_contiguous(
                memory_format=torch.channels_last)
            return out
        return forward

    for n, m in convs.items():
        m.forward = wrap(n, m.forward)
    try:
        st(x)
    finally:
        for m in convs.values():
            del m.forward
    return seen


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channels_last_only_where_the_graph_proves_it(monkeypatch, layout):
    from faststeal.nn.stack import LAYOUT_ENV

    # FunctionalCNN: conv1 feeds relu -> max_pool -> conv2 (safe); conv2 and conv3 reach
    # x.view(...) (never channels-last); ConvBNOut: conv1 -> BN (safe), conv2 is the output
    assert stack(FunctionalCNN, 2, seed=0, input_shape=(1, 28, 28)).channels_last_convs == \
        ["conv1"]
    assert stack(ConvBNOut, 2, seed=0, input_shape=(2, 8, 8)).channels_last_convs == ["conv1"]
    assert stack(FunctionalCNN, 1, seed=0).channels_last_convs == []  # one member: no twins
    hooked = FunctionalCNN()
    hooked.conv2.register_forward_hook(lambda m, i, o: None)  # could observe the layout
    assert stack(hooked, 2, seed=0, input_shape=(1, 28, 28)).channels_last_convs == []
    monkeypatch.setenv(LAYOUT_ENV, layout)
    cl = layout == "channels_last"
    for model, x in [(FunctionalCNN, torch.randn(4, 1, 28, 28)),
                     (ConvBNOut, torch.randn(5, 2, 8, 8))]:
        torch.manual_seed(3)
        st = stack(model, 3, seed=0, input_shape=tuple(x.shape[1:]))
        for m in st.modules():  # no dropout randomness in the comparison
            if type(m).__name__ == "_Dropout":
                m.p = 0.0
        members = _fresh(st)
        for m in members:
            for d in m.modules():
                if isinstance(d, nn.Dropout):
                    d.p = 0.0
        _check_equal(st, members, x, train=True)  # BatchNorm on batch statistics
        with torch.no_grad():
            torch.testing.assert_close(st.eval()(x), _loop(members, x, False), atol=1e-5,
                                       rtol=1e-4)
            assert _conv_layouts(st, x) == {n: cl and n == "conv1" for n in
                                            ("conv1", "conv2", "conv3") if hasattr(model(), n)}


@pytest.mark.parametrize("strategy", ["grouped", "unfold", "loop"])
def test_every_conv_strategy_returns_the_folded_batch(monkeypatch, strategy):
    monkeypatch.setenv("FASTSTEAL_CONV_STRATEGY", strategy)
    torch.manual_seed(4)
    st = stack(ConvBNOut, 3, seed=0, input_shape=(2, 8, 8))
    for m in st.modules():
        if type(m).__name__ == "_Dropout":
            m.p = 0.0
    members = _fresh(st)
    for m in members:
        m.drop.p = 0.0
    _check_equal(st, members, torch.randn(5, 2, 8, 8), train=True)


@pytest.mark.parametrize("prefer", ["contiguous", "channels_last"])
def test_layout_is_measured_once_and_leaves_the_model_as_it_was(monkeypatch, tmp_path, prefer):
    import importlib

    from faststeal.ops import tuning

    monkeypatch.setenv("FASTSTEAL_TUNE", "1")
    monkeypatch.setenv("FASTSTEAL_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.import_module("faststeal.nn.stack"), "LAYOUT_BUDGET_S", 0.01)
    monkeypatch.setattr(tuning, "BUDGET_S", 0.01)
    measure = tuning.measure

    def rigged(cands, *args):  # the real timing runs, then `prefer` wins (either can)
        times = measure(cands, *args)
        return {n: 0.0 if n == prefer else t for n, t in times.items()}

    monkeypatch.setattr(tuning, "measure", rigged)
    tuning.clear()
    try:
        x = torch.randn(6, 2, 8, 8)
        st = stack(ConvBNOut, 3, seed=0, input_shape=(2, 8, 8))
        ref = copy.deepcopy(st)
        before = tuning.tunings_run
        torch.manual_seed(5)
        got = st(x)  # tunes (timing runs in both layouts), then computes the call
        assert tuning.tunings_run > before
        keys = [k for k in tuning.decisions() if k.startswith("stack_layout|")]
        assert len(keys) == 1 and "grad,train" in keys[0]
        assert tuning.decisions()[keys[0]]["choice"] == prefer
        # the same call without any timing runs: dropout draws (which follow the layout's
        # memory order), batch-norm statistics and the output are what the tuned call gave
        monkeypatch.setenv("FASTSTEAL_STACK_LAYOUT", prefer)
        torch.manual_seed(5)
        want = ref(x)
        monkeypatch.delenv("FASTSTEAL_STACK_LAYOUT")
        torch.testing.assert_close(got, want)
        for (name, b), b_ref in zip(st.named_buffers(), ref.buffers()):
            assert torch.equal(b, b_ref), name  # batch-norm statistics updated once
        assert all(p.grad is None for p in st.parameters())  # timing left no gradients
        runs = tuning.tunings_run
        assert _conv_layouts(st, x) == {"conv1": prefer == "channels_last", "conv2": False}
        assert tuning.tunings_run == runs  # the decision is reused, and it is what runs
    finally:
        tuning.clear()


class ConvThen(nn.Module):
    """conv -> relu -> `then` -> linear: `then` decides whether the conv may write NHWC."""

    def __init__(self, then) -> None:
        super().__init__()
        self.conv, self.fc, self.then = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(48, 4), then

    def forward(self, x):
        return self.fc(self.then(F.relu(self.conv(x))).reshape(x.size(0), -1))


class FlagView(nn.Module):
    """Takes a `view` path only when a flag set after stacking says so (the trace saw none)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 1), \
            nn.Linear(48, 4)
        self.use_view = False

    def forward(self, x):
        h = F.relu(self.conv(x))
        h = h.view(h.size(0), -1).view(h.shape) if self.use_view else h
        return self.fc(torch.flatten(self.conv2(h), 1))


def test_channels_last_never_reaches_strided_views(monkeypatch):
    """A conv whose output can reach user code as a strided view of NHWC memory (a partial
    flatten, reshape, nn.Flatten(2), .data — each then `view`ed) stays NCHW; flattening from
    dim 1 copies, so it may write NHWC. Forced channels_last then runs every model."""
    cases = [(lambda t: torch.flatten(t, 2), []), (lambda t: t.reshape(t.size(0), 3, -1), []),
             (nn.Flatten(2), []), (lambda t: t.data, []),
             (lambda t: torch.flatten(t, 1), ["conv"]), (lambda t: t.flatten(1), ["conv"]),
             (nn.Flatten(), ["conv"]), (lambda t: t.contiguous(), ["conv"])]
    monkeypatch.setenv("FASTSTEAL_STACK_LAYOUT", "channels_last")
    x = torch.randn(2, 2, 4, 4)
    for then, want in cases:
        st = stack(lambda: ConvThen(then), 2, seed=0, input_shape=(2, 4, 4))
        assert st.channels_last_convs == want
        st(x).sum().backward()


def test_layout_guards(monkeypatch, tmp_path):
    """Tuning never writes the model (a graph still waiting for its backward stays valid); a
    hook registered after stacking keeps the model NCHW; the call's layout does not leak into
    a direct call of the body; a layout that fails on a path the trace did not see is reported
    and not taken; a bad FASTSTEAL_STACK_LAYOUT is an error for every model."""
    import importlib

    from faststeal.ops import tuning

    monkeypatch.setenv("FASTSTEAL_TUNE", "1")
    monkeypatch.setenv("FASTSTEAL_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.import_module("faststeal.nn.stack"), "LAYOUT_BUDGET_S", 0.01)
    monkeypatch.setattr(tuning, "BUDGET_S", 0.01)
    tuning.clear()
    try:
        st = stack(ConvBNOut, 2, seed=0, input_shape=(2, 8, 8))
        y1 = st(torch.randn(4, 2, 8, 8))
        runs = tuning.tunings_run
        y2 = st(torch.randn(40, 2, 8, 8))  # a new shape class: timed while y1 waits
        assert tuning.tunings_run > runs
        (y1.sum() + y2.sum()).backward()  # BN statistics were not modified in place
        st.eval()  # eval-mode batch norm saves the running statistics for its backward
        y1 = st(torch.randn(4, 2, 8, 8))
        st(torch.randn(40, 2, 8, 8)).sum().backward()
        y1.sum().backward()
        assert st._ctx.layout == "contiguous"
        st.train()

        monkeypatch.setenv("FASTSTEAL_STACK_LAYOUT", "channels_last")
        xf = torch.randn(6, 2, 8, 8)
        assert st.layout(xf) == "channels_last"
        handle = st.body.conv2.register_forward_hook(lambda m, i, o: None)
        assert st.layout(xf) == "contiguous"
        handle.remove()
        monkeypatch.setenv("FASTSTEAL_STACK_LAYOUT", "fastest")
        with pytest.raises(ValueError, match="FASTSTEAL_STACK_LAYOUT"):
            stack(TabularMLP, 2, seed=0, input_shape=(7,))(torch.randn(3, 7))
        monkeypatch.delenv("FASTSTEAL_STACK_LAYOUT")

        st = stack(FlagView, 2, seed=0, input_shape=(2, 4, 4))
        assert st.channels_last_convs == ["conv", "conv2"]  # the traced path has no view
        st.body.use_view = True
        x = torch.randn(3, 2, 4, 4)
        with pytest.warns(RuntimeWarning, match="channels_last layout failed"):
            y = st(x)
        members = _fresh(st)
        for m in members:
            m.use_view = True
        torch.testing.assert_close(y, _loop(members, x, True), atol=1e-5, rtol=1e-4)
        key = next(k for k in tuning.decisions() if k.startswith("stack_layout|")
                   and tuning.decisions()[k]["times_ms"].get("channels_last") is None)
        assert tuning.decisions()[key]["choice"] == "contiguous"
    finally:
        tuning.clear()


def test_stacked_input_one_batch_per_member():
    st = stack(TabularMLP, 2, seed=0, input_shape=(7,))
    members = _fresh(st.eval())
    xs = torch.randn(2, 4, 7)
    with torch.no_grad():
        torch.testing.assert_close(st(xs), torch.stack([m.eval()(x) for m, x in zip(members, xs)]))


def test_embedding_layernorm_and_integer_inputs():
    st = stack(TokenModel, 3, seed=0, input_shape=(5,))
    members = _fresh(st)
    idx = torch.randint(0, 11, (4, 5))
    _check_equal(st, members, idx, train=True)


def test_adam_step_equals_separate_steps():
    torch.manual_seed(0)
    st = stack(FunctionalCNN, 3, seed=5, input_shape=(1, 28, 28))
    members = _fresh(st.eval())
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    opt = torch.optim.Adam(st.parameters(), lr=1e-2)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in members]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(st(x).flatten(0, 1), y.repeat(3), reduction="sum").backward()
        opt.step()
        for m, o in zip(members, opts):
            o.zero_grad()
            F.cross_entropy(m(x), y, reduction="sum").backward()
            o.step()
    for a, b in zip(unstack(st), members):
        for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(v, w, atol=1e-5, rtol=1e-4, msg=k)


def test_round_trips_exactly():
    ms = [FunctionalCNN() for _ in range(3)]
    st = stack_from(ms)
    back = unstack(st)
    for a, b in zip(ms, back):
        assert type(b) is FunctionalCNN
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(),
                                                     b.state_dict().values()))
    again = stack_from(back)
    assert all(torch.equal(u, v) for u, v in zip(st.state_dict().values(),
                                                 again.state_dict().values()))
    st.load_member(1, ms[0])
    assert torch.equal(st.member(1).fc2.weight, ms[0].fc2.weight)


def test_init_reset_and_copy():
    t = TabularMLP()
    a = stack(t, 2, seed=1)
    b = stack(t, 2, seed=1)
    c = stack(t, 2, init="copy")
    assert torch.equal(a.body.head.weight, b.body.head.weight)  # seeded: reproducible
    assert not torch.equal(a.body.head.weight[0], a.body.head.weight[1])  # independent
    assert not torch.equal(a.body.head.weight[0], t.head.weight)
    assert torch.equal(c.body.head.weight[0], t.head.weight)
    assert torch.equal(c.body.head.weight[1], t.head.weight)


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return x * self.s


class WithUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.scale = _Scale()
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.scale(F.relu(self.fc(x)))
        return self.out(self.conv(h.unsqueeze(1)).flatten(1))


def test_vmap_fallback_warns_and_matches():
    with pytest.warns(UserWarning, match=r"submodule 'scale' \(_Scale\) has no stacked twin"):
        st = stack(WithUnsupported, 3, seed=0, input_shape=(4,))
    assert set(st.vmap_fallbacks) == {"scale", "conv"}
    members = _fresh(st)
    x = torch.randn(5, 4)
    _check_equal(st, members, x, train=True)
    g = torch.stack([m.scale.s.grad for m in members])
    got = torch.stack([c.s.grad for c in st.body.scale.copies])
    torch.testing.assert_close(got, g)


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(self.fc(x), self.fc.weight)


def test_direct_parameter_use_names_the_node():
    with pytest.raises(ValueError, match=r"graph node 'fc_weight' reads 'fc.weight'"):
        stack(TiedWeights, 2)


def test_mc_dropout_and_samples():
    st = stack(FunctionalCNN, 1, seed=0, input_shape=(1, 28, 28)).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        det = st(x, samples=4)
        assert torch.equal(det[0], det[3])  # eval: no dropout
        set_mc_dropout(st, True)
        mc = st(x, samples=4)
    assert mc.shape == (4, 2, 10) and not torch.equal(mc[0], mc[3])


def _count_rows(st):
    """Record the rows the first parameterised layer gets (a wrapped forward, not a hook: a hook
    turns the shared prefix off)."""
    first = next(m for m in st.body.modules() if hasattr(m, "weight") or hasattr(m, "w_mu"))
    rows, inner = [], first.forward

    def forward(x, *a, **k):
        rows.append(x.shape[0])
        return inner(x, *a, **k)
    first.forward = forward
    return rows


class FcDropFc(nn.Module):
    """fc1 -> dropout -> fc2 on (B, 12); the subclasses wire them in other forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(12, 12), nn.Dropout(0.5), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x)))


class SkipOverDropout(FcDropFc):
    """A value computed before the dropout is used after it: no shared prefix."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.drop(h) + h)


class NoiseBeforeDropout(FcDropFc):
    """Draws random numbers before its first dropout layer: no shared prefix."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.drop(h + 0.1 * torch.randn_like(h)))


@pytest.mark.parametrize("arch", ["mlp", "lenet", "resnet-small"])
@pytest.mark.parametrize("kind", ["mc-dropout", "bayesian"])
def test_shared_prefix_runs_once_and_equals_the_copies(arch, kind):
    from faststeal.models.zoo import build_model

    if kind == "bayesian":
        st = build_model(arch, (1, 8, 8), 10, bayesian=True).eval()
    else:
        st = build_model(arch, (1, 8, 8), 10, members=1, dropout=0.3).eval()
        set_mc_dropout(st, True)
    assert st.shared_prefix
    rows = _count_rows(st)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.manual_seed(4)
        shared = st(x, samples=5)
        st.shared_prefix = False  # the same call with the input copied five times first
        torch.manual_seed(4)
        copied = st(x, samples=5)
    # the first layer got the 3 input rows, not 15 copies (lenet's / resnet's conv body runs
    # once; mlp's fused-dropout Linear and a Bayesian layer make the copies themselves)
    assert rows == [3, 15]
    assert shared.shape == (5, 3, 10) and not torch.allclose(shared[0], shared[1])
    torch.testing.assert_close(shared, copied, atol=1e-5, rtol=1e-5)


class GumbelBeforeDropout(FcDropFc):
    def forward(self, x):
        return self.fc2(self.drop(F.gumbel_softmax(self.fc1(x))))


class SwitchableDropout(FcDropFc):
    """After stacking, a Python flag can swap its dropout layer for a functional dropout the
    trace never saw (or, with ``p=0``, for no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.functional = None

    def forward(self, x):
        if self.functional is None:
            return super().forward(x)
        return self.fc2(F.dropout(self.fc1(x), self.functional, training=True))


class CustomForwardDropout(nn.Module):
    """Linear, ReLU and Dropout modules in a custom forward that may skip the dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.use = True
        self.fc1, self.act, self.drop = nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        h = self.act(self.fc1(x))
        return self.fc2(self.drop(h) if self.use else h)


class BatchSecond(nn.Module):
    """(B, L, D) inputs moved to (L, B, D) before the dropout: the batch leaves dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.drop(self.fc1(x).transpose(0, 1))
        return self.fc2(h.transpose(0, 1).mean(1))


class DropoutInFallback(nn.Module):
    """A fused Linear+ReLU whose only reader is a dropout inside a submodule run under vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.blk, self.fc2 = nn.Linear(4, 8), nn.ReLU(), nn.Module(), \
            nn.Linear(8, 2)
        self.blk.drop = nn.Dropout(0.3)
        self.blk.scale = nn.Parameter(torch.ones(8))
        self.blk.forward = lambda x: self.blk.drop(x) * self.blk.scale

    def forward(self, x):
        return self.fc2(self.blk(self.act(self.fc1(x))))


class HeadFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.head = nn.LayerNorm(12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.norm(x))


def test_shared_prefix_only_where_the_graph_proves_it():
    for model in (SkipOverDropout, NoiseBeforeDropout, GumbelBeforeDropout):
        st = stack(model, 1, seed=0, input_shape=(12,)).eval()
        assert not st.shared_prefix, model.__name__
        set_mc_dropout(st, True)
        y = st(torch.randn(4, 12), samples=3)
        assert y.shape == (3, 4, 3) and not torch.allclose(y[0], y[1])
    assert not stack(SkipOverDropout, 2, seed=0, input_shape=(12,)).shared_prefix  # S > 1
    # the last layer as the first random one: features() needs the copies at its input
    st = stack_from([HeadFirst()], bayesian=True, input_shape=(12,)).eval()
    assert not st.shared_prefix
    assert st.features(torch.randn(20, 12), samples=4).shape == (4, 20, 12)


def test_shared_prefix_is_turned_off_at_call_time_where_it_could_show():
    from faststeal.models.zoo import build_model

    st = build_model("lenet", (1, 8, 8), 10, members=1, dropout=0.3).eval()
    set_mc_dropout(st, True)
    rows = _count_rows(st)
    x = torch.randn(3, 1, 8, 8)
    st(x, samples=4)
    assert rows == [3]  # shared
    # a stacked (T, B, ...) input: one copy per row block, nothing shared, T copies out
    xs = torch.randn(4, 3, 1, 8, 8)
    set_mc_dropout(st, False)
    y = st(xs)
    assert rows[-1] == 12 and y.shape == (4, 3, 10)
    for t in range(4):
        torch.testing.assert_close(y[t], st(xs[t])[0], atol=1e-5, rtol=1e-5)
    set_mc_dropout(st, True)
    # a batch norm in training mode inside an eval stack: its batch statistics see all copies
    bn_st = build_model("cnn-wide", (1, 8, 8), 10, members=1, dropout=0.3).eval()
    set_mc_dropout(bn_st, True)
    bn_rows = _count_rows(bn_st)
    next(m for m in bn_st.modules() if "BatchNorm" in type(m).__name__).train()
    bn_st(x, samples=4)
    assert bn_rows == [12]
    # a module hook would see B rows instead of T*B, or share its noise: no sharing
    handle = st.body.body[0].register_forward_hook(lambda m, i, o: None)
    st(x, samples=4)
    assert rows[-1] == 12
    handle.remove()
    # an exception in the body leaves no pending copies behind
    with pytest.raises(RuntimeError):
        st(torch.randn(3, 1, 8, 8).to(torch.float64), samples=4)
    assert st._ctx.pending == 1 and st._ctx.copies >= 1
    # a path switched after stacking that never reaches the dropout layer: the call reruns
    # unshared, so a functional dropout there still draws per copy (and p=0 gives equal copies)
    sw = stack(SwitchableDropout, 1, seed=0, input_shape=(12,)).eval()
    assert sw.shared_prefix
    for p, equal in [(0.5, False), (0.0, True)]:
        sw.body.functional = p
        y = sw(torch.randn(5, 12), samples=3)
        assert y.shape == (3, 5, 3) and torch.equal(y[0], y[2]) == equal
    # the batch moved off dim 0 before the dropout: not shared (and checked at run time too)
    bs = stack(BatchSecond, 1, seed=0, input_shape=(5, 8)).eval()
    assert not bs.shared_prefix
    bs.shared_prefix = True  # force it: the copy at the dropout sees L rows, not B, and unshares
    x = torch.randn(4, 5, 8)
    torch.testing.assert_close(bs(x, samples=2), bs(x).expand(2, 4, 3))


def test_dropout_after_a_fused_relu_keeps_its_own_flags(monkeypatch):
    from faststeal.methods import build_method
    from faststeal.nn.stack import _Dropout, _Fold, _Linear

    seq = lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.4),  # noqa: E731
                                nn.Linear(16, 3))
    st = stack(seq, 1, seed=0, input_shape=(12,))
    lin, drop = st.body[0], st.body[2]
    assert isinstance(lin, _Linear) and type(drop) is _Dropout and st.shared_prefix
    assert lin.__dict__["_fold"] is drop.__dict__["_fold"] and lin.dropout == 0
    # train mode drops (the Linear's op applies the mask on the CPU), eval does not ...
    x = torch.randn(64, 12)
    torch.manual_seed(0)
    h = drop(st.body[1](lin(x)))  # the body's path: Linear (+relu, mask), Identity, dropout
    h0 = torch.relu(F.linear(x, lin.weight[0], lin.bias[0]))
    kept = (h != 0) & (h0 != 0)
    assert 0.3 < float(kept.sum() / (h0 != 0).sum()) < 0.9  # dropped once, kept x 1/(1-p)
    torch.testing.assert_close(h[kept], h0[kept] / 0.6)
    st.eval()
    assert torch.equal(st(x), st(x))
    # ... and the dropout module's own flags decide: train() on it alone, or a new p
    drop.train()
    assert not torch.equal(st(x), st(x))
    drop.eval()
    set_mc_dropout(st, True)
    drop.p = 0.0
    assert torch.equal(st(x), st(x))
    # MC Dropout takes such a model (its dropout layer is still there), also with dropout=p
    for factory, kw in [(seq, {}), (lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(),
                                                        nn.Linear(16, 3)), {"dropout": 0.3})]:
        m = build_method("mc-dropout", surrogate=factory, input_shape=(12,), num_classes=3, **kw)
        p = m.predict_members(torch.randn(6, 12))
        assert p.shape == (20, 6, 3) and not torch.allclose(p[0], p[1])
    # replaced after stacking: the Linear no longer masks (the fold is checked per call)
    st = stack(seq, 1, seed=0, input_shape=(12,)).train()
    st.body[2] = nn.Identity()
    assert float((st.body[0](x) == 0).float().mean()) < 0.6  # the relu's zeros only (~0.5)
    # off the CPU the dropout module runs itself (forced here), still dropping once
    monkeypatch.setattr(_Fold, "active", lambda self, x: False)
    st = stack(seq, 1, seed=0, input_shape=(12,))
    h = st.body[2](st.body[1](st.body[0](x)))
    h0 = torch.relu(F.linear(x, st.body[0].weight[0], st.body[0].bias[0]))
    kept = (h != 0) & (h0 != 0)
    torch.testing.assert_close(h[kept], h0[kept] / 0.6)
    assert 0.3 < float(kept.sum() / (h0 != 0).sum()) < 0.9
    monkeypatch.undo()
    # not folded where another kind of dropout follows the ReLU, outside an nn.Sequential
    # (a custom forward may skip or reuse the dropout), or inside a vmap fallback
    st = stack(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.AlphaDropout(0.4),
                                     nn.Linear(16, 3)), 1, seed=0, input_shape=(12,))
    assert "_fold" not in st.body[0].__dict__
    sk = stack(CustomForwardDropout, 1, seed=0, input_shape=(12,))
    assert sk.fused_relus == ["fc1"] and "_fold" not in sk.body.fc1.__dict__
    sk.train()
    sk.body.use = False  # skips the dropout: nothing may drop
    assert float((sk.body.act(sk.body.fc1(x)) == 0).float().mean()) < 0.65
    with pytest.warns(UserWarning, match="vmap"):
        fb = stack(DropoutInFallback, 2, seed=0, input_shape=(4,))
    assert fb.fused_relus == ["fc1"] and "_fold" not in fb.body.fc1.__dict__


def test_bayesian_stack_draws_samples_and_keeps_means():
    t = FunctionalCNN()
    st = stack_from([t], bayesian=True, input_shape=(1, 28, 28)).eval()
    x = torch.randn(2, 1, 28, 28)
    y = st(x, samples=3)
    assert y.shape == (3, 2, 10) and not torch.equal(y[0], y[1])
    assert float(st.kl().detach()) > 0
    mean = st.member(0)
    assert torch.equal(mean.fc2.weight, t.fc2.weight)


def test_features_are_the_head_input():
    st = stack(FunctionalCNN, 2, seed=0, input_shape=(1, 28, 28)).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        phi = st.features(x)
        assert phi.shape == (2, 3, 32)
        torch.testing.assert_close(torch.einsum("sbf,scf->sbc", phi, st.head.weight)
                                   + st.head.bias[:, None], st(x), atol=1e-5, rtol=1e-5)


def test_zoo_plain_factory_stacks():
    from faststeal.models.zoo import FACTORIES, build_model

    st = stack(lambda: FACTORIES["lenet"]((1, 28, 28), 10), 2, seed=0, input_shape=(1, 28, 28))
    # the zoo's plain models trace, so their hidden Linear+ReLU pairs fuse; build_model's
    # stack of a zoo name is this same path
    assert st.fused_relus == ["body.7", "body.9"]
    assert stack(lambda: FACTORIES["mlp"]((1, 28, 28), 10), 2, seed=0,
                 input_shape=(1, 28, 28)).fused_relus == ["body.1", "body.3"]
    zoo = build_model("lenet", (1, 28, 28), 10, members=2)
    assert isinstance(zoo, StackedModule) and zoo.fused_relus == st.fused_relus


def test_bad_arguments():
    with pytest.raises(ValueError, match="members must be a positive int"):
        stack(TabularMLP, 0)
    with pytest.raises(ValueError, match="init must be one of"):
        stack(TabularMLP, 2, init="zeros")
    with pytest.raises(TypeError, match="must be an nn.Module or a zero-argument factory"):
        stack(3, 2)
    with pytest.raises(TypeError, match="must return an nn.Module"):
        stack(lambda: 3, 2)
    with pytest.raises(ValueError, match="modules\\[1\\] does not have the submodules"):
        stack_from([TabularMLP(), FunctionalCNN()])
    with pytest.raises(ValueError, match="differs from modules\\[0\\] in state"):
        stack_from([TabularMLP(7), TabularMLP(6)])
    with pytest.raises(ValueError, match="bayesian=True stacks one module"):
        stack_from([TabularMLP(), TabularMLP()], bayesian=True)
    with pytest.raises(ValueError, match="last_layer 'nope' is not a submodule"):
        stack(TabularMLP, 2, last_layer="nope")
    st = stack(TabularMLP, 2, input_shape=(7,))
    with pytest.raises(ValueError, match="member index must be an int in \\[0, 2\\)"):
        st.member(2)
    with pytest.raises(ValueError, match="x has 3 members on dim 0 but the model has 2"):
        st(torch.randn(3, 4, 7))
    with pytest.raises(ValueError, match="x must be \\(batch, 7\\)"):
        st(torch.randn(3, 4, 5, 7))
    with pytest.raises(TypeError, match="StackedModule"):
        unstack(TabularMLP())
    assert isinstance(faststeal.stack(TabularMLP, 1), StackedModule)


def test_template_is_not_modified():
    t = FunctionalCNN()
    before = copy.deepcopy(t.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stack(t, 2, seed=0)
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())


def test_new_stacked_layers_check_their_inputs():
    from faststeal.nn import EnsembleConv2d, EnsembleEmbedding, EnsembleLayerNorm, ensemble_conv2d

    ln = EnsembleLayerNorm(2, 5)
    with pytest.raises(ValueError, match=r"x must be \(members, batch, ..., \(5,\)\)"):
        ln(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="EnsembleLayerNorm has 2 members but x has 3"):
        ln(torch.randn(3, 4, 5))
    emb = EnsembleEmbedding(2, 7, 3)
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        emb(torch.randn(2, 4))
    out = emb(torch.tensor([[1, 2], [1, 2]]))
    torch.testing.assert_close(out[1], emb.weight[1, [1, 2]])
    with pytest.raises(ValueError, match="groups=3 must divide in_channels=4"):
        EnsembleConv2d(2, 4, 6, 3, groups=3)
    w = torch.randn(2, 4, 2, 3, 3)
    with pytest.raises(ValueError, match="strategy 'unfold' supports groups=1"):
        ensemble_conv2d(torch.randn(2, 1, 4, 5, 5), w, None, (1, 1), (1, 1), "unfold",
                        groups=2)
    # grouped == loop with groups and dilation, shared and stacked inputs
    x = torch.randn(2, 3, 4, 9, 9)
    for xi in (x, x[0]):
        ref = ensemble_conv2d(xi, w, None, (1, 1), (2, 2), "loop", (2, 2), 2)
        got = ensemble_conv2d(xi, w, None, (1, 1), (2, 2), "grouped", (2, 2), 2)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
