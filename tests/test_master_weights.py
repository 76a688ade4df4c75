"""faststeal.master_weights: bf16 training whose Adam step writes the weights' bfloat16 copies.

The oracle of the fused update is torch.optim.Adam(fused=True) itself, fed the float32 sum of the
gradients; the oracle of the training step is the cast path (FASTSTEAL_BF16_COPIES=0)."""

import contextlib
import math

import pytest
import torch

from faststeal import _ext, master_weights
from faststeal.master_weights import MasterWeights
from faststeal.models import build_model
from faststeal.train_step import make_optimizer, make_train_step

pytestmark = [pytest.mark.skipif(_ext.C is None, reason="faststeal._C not built"),
              pytest.mark.usefixtures("one_thread")]


def _same_bf16(a, b) -> bool:
    """Bit-equal bfloat16 tensors, except that a NaN matches any NaN: torch's own cast writes
    0x7FC0 from its scalar path and 0xFFFF from its AVX-512 one (the kernel: 0x7FC0, c10's
    rule)."""
    a, b = a.detach(), b.detach()
    nan = a.isnan()
    return (torch.equal(nan, b.isnan())
            and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16)))


def _torch_adam(p, g, m, v, step, lr, betas, eps, wd):
    """p, m, v after torch.optim.Adam(fused=True)'s update number ``step`` from state (m, v)."""
    param = torch.nn.Parameter(p.clone())
    opt = torch.optim.Adam([param], lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=True)
    opt.state[param] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.clone(),
                        "exp_avg_sq": v.clone()}
    param.grad = g.clone()
    opt.step()
    st = opt.state[param]
    return param.detach(), st["exp_avg"], st["exp_avg_sq"]


#: only under torch's AVX2 / AVX-512 kernels does the fused update claim ATen's bits
EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _kernel(p, gb, gf, m, v, copy, step, lr, betas, eps, wd):
    _ext.C.adam_bf16_step_cpu([p], [gb], [gf], [m], [v], [copy], [step], [p.numel()], lr,
                              betas[0], betas[1], eps, wd)


def _case(n, seed, with_f32):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    m = 0.1 * torch.randn(n, generator=gen)
    v = torch.rand(n, generator=gen) * 0.01
    gb = torch.randn(n, generator=gen).to(torch.bfloat16)
    gf = torch.randn(n, generator=gen) * 0.5 if with_f32 else None
    return p, m, v, gb, gf, (gb.float() + gf if with_f32 else gb.float())


def _mw_update(p, gb, gf, m, v, step, lr, wd):
    """MasterWeights' update of p (betas 0.9, 0.999, eps 1e-8); returns the new copy."""
    copy = torch.empty(p.shape, dtype=torch.bfloat16, requires_grad=True)
    copy.grad = gb
    state = {"step": torch.tensor(float(step - 1)), "exp_avg": m, "exp_avg_sq": v}
    with torch.no_grad():
        p.grad = gf
        master_weights._update([p], [copy], [state], {"lr": lr, "eps": 1e-8, "weight_decay": wd,
                                                      "betas": (0.9, 0.999)})
        p.grad = None
    return copy


def _check_against(got, want):
    for a, b in zip(got, want):
        if EXACT:
            assert torch.equal(a, b)
        else:  # another vector ISA: ATen's arithmetic may differ in the last bit
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# lengths that are multiples of ATen's vector width (its scalar tail is torch's, below); the
# largest split over two threads
@pytest.mark.parametrize("n", [16, 48, 70000])
@pytest.mark.parametrize("with_f32", [False, True])
@pytest.mark.parametrize("wd,step,beta1", [(0.0, 1, 0.9), (0.01, 7, 0.9), (0.01, 3, 0.3)])
def test_fused_kernel_is_torch_adams_vector_loop(n, with_f32, wd, step, beta1):
    # beta1 0.3: ATen's lerp with a weight >= 0.5 (its other form)
    p, m, v, gb, gf, g = _case(n, n + step, with_f32)
    hyper = (step, 1e-2, (beta1, 0.999), 1e-8, wd)
    want = _torch_adam(p, g, m, v, *hyper)
    copy = torch.full((n,), float("nan"), dtype=torch.bfloat16)  # every element must be written
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _kernel(p, gb, gf, m, v, copy, *hyper)
    finally:
        torch.set_num_threads(threads)
    _check_against((p, m, v), want)
    assert _same_bf16(copy, p.to(torch.bfloat16))


@pytest.mark.parametrize("n", [1, 12, 37, 70003])  # all tail, tails of 12 / 5 / 3 floats
@pytest.mark.parametrize("with_f32", [False, True])
def test_master_weights_update_is_torch_adam_at_any_length(n, with_f32):
    # MasterWeights' update: the kernel on the vector part, torch's fused Adam on ATen's tail
    p, m, v, gb, gf, g = _case(n, n, with_f32)
    want = _torch_adam(p, g, m, v, 5, 1e-2, (0.9, 0.999), 1e-8, 0.01)
    copy = _mw_update(p, gb, gf, m, v, 5, 1e-2, 0.01)
    _check_against((p, m, v), want)
    assert _same_bf16(copy, p.to(torch.bfloat16))


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                    reason="checks the AVX2 kernels of an AVX-512 torch")
def test_fused_update_follows_aten_avx2_kernels_too():
    # ATEN_CPU_CAPABILITY=avx2 makes torch run its AVX2 kernels (8-float vectors, other tails)
    import subprocess
    import sys
    code = """
import torch, sys
sys.path.insert(0, %r)
from faststeal import master_weights
from test_master_weights import _case, _kernel, _mw_update, _torch_adam
assert torch.backends.cpu.get_cpu_capability() == "AVX2" and master_weights._ATEN_VEC_WIDTH == 8
for n in (8, 40, 70000):
    p, m, v, gb, _, g = _case(n, n, False)
    want = _torch_adam(p, g, m, v, 3, 1e-2, (0.9, 0.999), 1e-8, 0.01)
    _kernel(p, gb, None, m, v, torch.empty(n, dtype=torch.bfloat16), 3, 1e-2, (0.9, 0.999),
            1e-8, 0.01)
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), want)), n
for n in (7, 37, 70003):
    p, m, v, gb, _, g = _case(n, n, False)
    want = _torch_adam(p, g, m, v, 3, 1e-2, (0.9, 0.999), 1e-8, 0.01)
    _mw_update(p, gb, None, m, v, 3, 1e-2, 0.01)
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), want)), n
print("ok")
""" % str(__import__("pathlib").Path(__file__).parent)
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_copy_rounds_like_tensor_to_bfloat16():
    # lr 0 leaves p as it is: the copy is then exactly the rounding of the given bits - ties to
    # even both ways, the carry into the exponent, overflow to inf, subnormals, signed zeros,
    # infinities - and NaNs of any payload and sign stay NaNs
    bits = [0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0x3FFFFFFF, 0x7F7FFFFF, 0x7F7F7FFF,
            0x00000001, 0x00018000, 0x80000000, 0x00000000, 0x7F800000, 0xFF800000, 0x7FC00001,
            0xFFC00000, 0x7F800001, 0xFF812345, 0xBF808000]
    p = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits],
                     dtype=torch.int32).view(torch.float32)
    want = p.to(torch.bfloat16)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    copy = torch.empty_like(want)
    before = p.clone()
    _kernel(p, torch.zeros_like(want), None, m, v, copy, 1, 0.0, (0.9, 0.999), 1e-8, 0.0)
    # p - 0 keeps every value (arithmetic quiets a signalling NaN's payload, still a NaN)
    finite = ~before.isnan()
    assert torch.equal(p[finite].view(torch.int32), before[finite].view(torch.int32))
    assert p[~finite].isnan().all()
    assert _same_bf16(copy, want)


def test_non_finite_gradients_propagate_as_in_torch_adam():
    # in the kernel's part (the first 16) and in torch's (the last 4 of 20)
    p = torch.arange(1.0, 21.0)
    gb = torch.ones(20, dtype=torch.bfloat16)
    gb[[0, 1, 2, 16, 17, 18]] = torch.tensor([float("nan"), float("inf"), -float("inf")] * 2,
                                             dtype=torch.bfloat16)
    m, v = torch.zeros(20), torch.zeros(20)
    want = _torch_adam(p, gb.float(), m, v, 1, 1e-3, (0.9, 0.999), 1e-8, 0.0)
    copy = _mw_update(p, gb, None, m, v, 1, 1e-3, 0.0)
    for got, ref in zip((p, m, v), want):
        torch.testing.assert_close(got, ref, equal_nan=True, rtol=0, atol=0)
    assert p[[0, 1, 2, 16, 17, 18]].isnan().all() and not p[[3, 15, 19]].isnan().any()
    assert _same_bf16(copy, p.to(torch.bfloat16))


def test_kernel_checks_name_the_argument():
    f32, bf = torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)

    def call(**kw):
        # one parameter's lists (index 0 of every list argument) and the group's scalars
        args = dict(params=f32.clone(), grads_bf16=bf, grads_f32=None, exp_avgs=f32.clone(),
                    exp_avg_sqs=f32.clone(), copies=bf.clone(), steps=1, counts=4, lr=1e-3,
                    beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        args.update({k: args[v] if isinstance(v, str) else v for k, v in kw.items()})
        lists = [[args[k]] for k in list(args)[:8]]
        _ext.C.adam_bf16_step_cpu(*lists, *list(args.values())[8:])

    call()  # the valid call runs
    cases = [({"params": bf.clone()}, r"params\[0\] must be Float"),
             ({"grads_bf16": f32}, r"grads_bf16\[0\] must be BFloat16"),
             ({"grads_f32": torch.zeros(5)}, r"grads_f32\[0\] must have params\[0\]'s shape"),
             ({"exp_avgs": torch.zeros(2, 2)}, r"exp_avgs\[0\] must have params\[0\].s shape"),
             ({"exp_avg_sqs": torch.zeros(4, 2)[:, 0]}, r"exp_avg_sqs\[0\] must be contiguous"),
             ({"copies": f32.clone()}, r"copies\[0\] must be BFloat16"),
             ({"steps": 0}, r"steps\[0\] must be >= 1"),
             ({"counts": 5}, r"counts\[0\] must be in \[0, 4\]"),
             ({"counts": -1}, r"counts\[0\] must be in \[0, 4\]"),
             ({"lr": -1.0}, "lr must be >= 0"),
             ({"beta2": 1.0}, "betas must be in"),
             ({"eps": -1e-8}, "eps must be >= 0"),
             ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
             ({"copies": bf}, "refer to a single memory location"),  # copy is grad_bf16
             ({"exp_avg_sqs": "exp_avgs"}, "refer to a single memory location")]
    for kw, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call(**kw)
    with pytest.raises(RuntimeError, match="must be lists of one length, got 1, 1, 1, 1, 1, 1, "
                                           "2 and 1"):
        _ext.C.adam_bf16_step_cpu([f32.clone()], [bf], [None], [f32.clone()], [f32.clone()],
                                  [bf.clone()], [1, 1], [4], 1e-3, 0.9, 0.999, 1e-8, 0.0)


def test_one_call_updates_every_parameter_as_torch_adam_does_each():
    # MasterWeights updates a group's parameters in one kernel call (one parallel pass over all
    # of them, tails to torch in one call): each must come out as torch's Adam alone makes it,
    # at its own step count, with or without a float32 gradient
    # three threads split the joined 103,072 elements inside the third tensor, twice
    cases = [_case(n, n, f32) + (step,) for n, f32, step in
             ((33000, True, 5), (48, True, 1), (70000, False, 3), (37, False, 9), (1, True, 2))]
    want = [_torch_adam(p, g, m, v, step, 1e-2, (0.9, 0.999), 1e-8, 0.01)
            for p, m, v, gb, gf, g, step in cases]
    copies, states = [], []
    for p, m, v, gb, gf, g, step in cases:
        copies.append(torch.empty(p.shape, dtype=torch.bfloat16, requires_grad=True))
        copies[-1].grad = gb
        p.grad = gf
        states.append({"step": torch.tensor(float(step - 1)), "exp_avg": m, "exp_avg_sq": v})
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with torch.no_grad():
            master_weights._update([c[0] for c in cases], copies, states,
                                   {"lr": 1e-2, "eps": 1e-8, "weight_decay": 0.01,
                                    "betas": (0.9, 0.999)})
    finally:
        torch.set_num_threads(threads)
    for (p, m, v, *_, step), w, copy, st in zip(cases, want, copies, states):
        _check_against((p, m, v), w)
        assert _same_bf16(copy, p.to(torch.bfloat16))
        assert st["step"].item() == step  # counted once


def test_a_rejected_update_changes_nothing():
    # the kernel checks every parameter - also one short enough to be all tail, which only
    # torch's Adam updates - before it writes any or counts a step
    for bad in (1, 2):
        cases = [_case(48, 1, False), _case(32, 2, False), _case(5, 3, False)]
        copies = []
        for *_, gb, _, _ in cases:
            copies.append(torch.zeros(gb.shape, dtype=torch.bfloat16, requires_grad=True))
            copies[-1].grad = gb
        states = [{"step": torch.tensor(2.0), "exp_avg": m, "exp_avg_sq": v}
                  for _, m, v, *_ in cases]
        states[bad]["exp_avg_sq"] = torch.zeros(64)  # wrong shape
        before = [t.clone() for p, m, v, *_ in cases for t in (p, m, v)]
        with torch.no_grad(), pytest.raises(RuntimeError,
                                            match=rf"exp_avg_sqs\[{bad}\] must have params"):
            master_weights._update([c[0] for c in cases], copies, states,
                                   {"lr": 1e-2, "eps": 1e-8, "weight_decay": 0.0,
                                    "betas": (0.9, 0.999)})
        after = [t for p, m, v, *_ in cases for t in (p, m, v)]
        assert all(torch.equal(a, b) for a, b in zip(after, before))
        assert [st["step"].item() for st in states] == [2.0, 2.0, 2.0]
        assert not any(c.detach().any() for c in copies)


def test_a_parameter_listed_twice_is_updated_once(monkeypatch):
    # torch.optim only warns about a repeated parameter; the update must not run (or count) twice
    monkeypatch.setenv(master_weights.ENV, "1")
    p = torch.nn.Parameter(torch.randn(32))
    q = torch.nn.Parameter(p.detach().clone())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = make_optimizer([p, p], lr=1e-2)
    ref = torch.optim.Adam([q], lr=1e-2, fused=True)
    mw = master_weights.MasterWeights(opt)
    with mw.active():
        copy = master_weights.cast(p, torch.bfloat16)
    assert copy is mw._copies[id(p)].leaf
    (copy.float() * torch.arange(32.0)).sum().backward()
    q.grad = copy.grad.float()
    mw.step()
    ref.step()
    assert torch.equal(p, q) if EXACT else torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    assert opt.state[p]["step"].item() == 1.0


def _train(copies: bool, monkeypatch, steps=6, model_fn=None, wd=0.0, edit=None):
    monkeypatch.setenv(master_weights.ENV, "1" if copies else "0")
    torch.manual_seed(0)
    model = (model_fn or (lambda: build_model("mlp", (1, 8, 8), 4, members=3)))()
    opt = make_optimizer(model.parameters(), lr=1e-2, weight_decay=wd)
    step = make_train_step(model, opt, precision="bf16")
    assert (step.master_weights is not None) == copies
    gen = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        x = torch.randn(3, 16, 1, 8, 8, generator=gen)
        y = torch.randint(0, 4, (3, 16), generator=gen)
        if edit is not None:
            edit(i, model, opt)
        losses.append(float(step(x, y)))
    return model, opt, step, losses


def _assert_same_training(m1, m0, l1, l0):
    """The copies path (m1, l1) trained as the cast path (m0, l0): bit for bit where the kernel
    follows ATen's arithmetic, else to the last-bit differences of the update."""
    if EXACT:
        assert l1 == l0
        assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m0.parameters()))
    else:
        assert max(abs(a - b) for a, b in zip(l1, l0)) < 1e-3
        for a, b in zip(m1.parameters(), m0.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=5e-3)


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_training_step_matches_the_cast_path(monkeypatch, wd):
    m1, o1, s1, l1 = _train(True, monkeypatch, wd=wd)
    m0, o0, _, l0 = _train(False, monkeypatch, wd=wd)
    # every Linear weight and bias went through its copy (3 layers x 2), none left stale
    assert len(s1.master_weights._copies) == 6
    assert all(c.leaf.grad is None for c in s1.master_weights._copies.values())
    assert all(p.grad is None for p in m1.parameters())
    for p in m1.parameters():  # each copy is its parameter's bf16 rounding
        assert _same_bf16(s1.master_weights._copies[id(p)].leaf, p.to(torch.bfloat16))
    assert l1[0] == l0[0]  # the same bf16 weights in the first forward, whatever the ISA
    _assert_same_training(m1, m0, l1, l0)
    # the optimizer state is the one torch.optim.Adam keeps: same keys, dtypes, shapes, steps
    sd1, sd0 = o1.state_dict()["state"], o0.state_dict()["state"]
    assert sd1.keys() == sd0.keys()
    for k in sd1:
        assert sd1[k].keys() == sd0[k].keys()
        for name in sd1[k]:
            assert sd1[k][name].dtype == sd0[k][name].dtype
            assert sd1[k][name].shape == sd0[k][name].shape
        assert float(sd1[k]["step"]) == float(sd0[k]["step"]) == 6


class _Shared(torch.nn.Module):
    """One stacked weight used twice in a forward (its gradients are summed)."""

    def __init__(self):
        super().__init__()
        from faststeal.nn import EnsembleLinear
        self.a = EnsembleLinear(3, 64, 16)
        self.b = EnsembleLinear(3, 16, 16, activation="relu")
        self.c = EnsembleLinear(3, 16, 4)

    def forward(self, x):
        h = self.a(x.flatten(2) if x.dim() == 5 else x.flatten(1))
        return self.c(self.b(self.b(h)))


def test_a_parameter_used_twice_sums_its_gradients_in_float32(monkeypatch):
    m1, _, s1, l1 = _train(True, monkeypatch, model_fn=_Shared)
    m0, _, _, l0 = _train(False, monkeypatch, model_fn=_Shared)
    assert l1[0] == l0[0]
    _assert_same_training(m1, m0, l1, l0)


def test_a_parameter_changed_outside_the_step_gets_a_fresh_copy(monkeypatch):
    saved = {}

    def edit(i, model, opt):
        p = next(model.parameters())
        if i == 2:
            with torch.no_grad():
                p.mul_(0.5)  # an in-place edit: the version counter moves
        if i == 4:
            saved["sd"] = {k: v.clone() for k, v in model.state_dict().items()}
            model.load_state_dict({k: v * 0.9 for k, v in saved["sd"].items()})

    m1, _, _, l1 = _train(True, monkeypatch, edit=edit)
    m0, _, _, l0 = _train(False, monkeypatch, edit=edit)
    # a stale copy would compute steps 2 and 4 with the old weights: far from the cast path
    _assert_same_training(m1, m0, l1, l0)


def test_disabled_reason_names_what_keeps_the_cast_path(monkeypatch):
    params = [torch.nn.Parameter(torch.zeros(2, 3))]
    assert master_weights.disabled_reason(make_optimizer(params)) is None
    cases = [(lambda ps: torch.optim.SGD(ps, lr=0.1), "SGD"),
             (lambda ps: torch.optim.AdamW(ps, fused=True), "AdamW"),
             (lambda ps: torch.optim.Adam(ps, fused=True, amsgrad=True), "amsgrad"),
             (lambda ps: torch.optim.Adam(ps, fused=True, maximize=True), "maximize"),
             (lambda ps: torch.optim.Adam(ps), "without fused"),
             (lambda ps: torch.optim.Adam(ps, lr=torch.tensor(1e-3), fused=True), "tensor lr")]
    for make, msg in cases:
        assert msg in master_weights.disabled_reason(make(params))
        with pytest.raises(ValueError, match=msg):
            MasterWeights(make(params))
        model = build_model("mlp", (1, 4, 4), 3, members=2)
        assert make_train_step(model, make(model.parameters()),
                               precision="bf16").master_weights is None
    monkeypatch.setenv(master_weights.ENV, "0")
    assert master_weights.ENV in master_weights.disabled_reason(make_optimizer(params))
    monkeypatch.setenv(master_weights.ENV, "1")
    model = build_model("mlp", (1, 4, 4), 3, members=2)
    assert make_train_step(model, precision="fp32").master_weights is None
    assert make_train_step(model, precision="bf16").master_weights is not None


def _stepped_tiny_mlp(monkeypatch):
    """A 2-member bf16 mlp step with the copies on, after one step: (model, step, x, y)."""
    monkeypatch.setenv(master_weights.ENV, "1")
    model = build_model("mlp", (1, 4, 4), 3, members=2)
    step = make_train_step(model, precision="bf16")
    x, y = torch.randn(2, 8, 1, 4, 4), torch.randint(0, 3, (2, 8))
    step(x, y)
    return model, step, x, y


def test_copies_are_used_only_inside_a_training_forward(monkeypatch):
    model, step, x, y = _stepped_tiny_mlp(monkeypatch)
    w = next(model.parameters())
    mw = step.master_weights
    leaf = mw._copies[id(w)].leaf
    assert master_weights.cast(w, torch.bfloat16) is not leaf  # outside a training forward
    with mw.active():
        with torch.no_grad():  # an evaluation inside: a cast, the copy stays for the training use
            assert master_weights.cast(w, torch.bfloat16) is not leaf
        with master_weights.paused():  # the tuner's timed forwards
            assert master_weights.cast(w, torch.bfloat16) is not leaf
        assert master_weights.cast(w, torch.float16).dtype == torch.float16
        first = master_weights.cast(w, torch.bfloat16)
        second = master_weights.cast(w, torch.bfloat16)  # a second use: the plain cast
    assert first is leaf and second is not leaf
    assert torch.equal(second, leaf.detach()) and not math.isnan(float(step(x, y)))


def test_gradients_of_two_backwards_are_summed_in_float32(monkeypatch):
    # two forward/backward passes before one step: the copy's first gradient moves to p.grad in
    # float32 when the second forward starts (no bfloat16 sum), as the cast path sums them
    def run(on):
        monkeypatch.setenv(master_weights.ENV, on)
        torch.manual_seed(0)
        model = build_model("mlp", (1, 8, 8), 4, members=3)
        opt = make_optimizer(model.parameters(), lr=1e-2)
        step = make_train_step(model, opt, precision="bf16")
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for _ in range(2):
                x = torch.randn(3, 16, 1, 8, 8, generator=gen)
                y = torch.randint(0, 4, (3, 16), generator=gen)
                with (step.master_weights.active() if step.master_weights else
                      contextlib.nullcontext()):
                    loss = step._loss(x, y)
                loss.backward()
            (step.master_weights or opt).step()
            opt.zero_grad(set_to_none=True)
        return model

    m1, m0 = run("1"), run("0")
    for a, b in zip(m1.parameters(), m0.parameters()):
        if EXACT:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=5e-3)


def test_a_graph_holding_an_updated_copy_fails_loudly(monkeypatch):
    # the kernel writes p and the copy in place: autograd's version check sees it. 8 classes:
    # every tensor's length is a multiple of 16, so the kernel alone updates them all (torch's
    # own ops, which bump versions anyway, update no tail)
    monkeypatch.setenv(master_weights.ENV, "1")
    model = build_model("mlp", (1, 4, 4), 8, members=2)
    assert all(p.numel() % 16 == 0 for p in model.parameters())
    opt = make_optimizer(model.parameters(), lr=1e-2)
    step = make_train_step(model, opt, precision="bf16")
    x, y = torch.randn(2, 8, 1, 4, 4), torch.randint(0, 8, (2, 8))
    with step.master_weights.active():
        loss = step._loss(x, y)
    loss.backward(retain_graph=True)
    versions = {id(p): (p._version, c.leaf._version)
                for p in model.parameters() for c in [step.master_weights._copies[id(p)]]}
    step.master_weights.step()
    for p in model.parameters():
        leaf = step.master_weights._copies[id(p)].leaf
        assert p._version > versions[id(p)][0] and leaf._version > versions[id(p)][1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_zero_grad_discards_the_copies_gradients(monkeypatch):
    model, step, x, y = _stepped_tiny_mlp(monkeypatch)
    mw = step.master_weights
    with mw.active():
        step._loss(x, y).backward()
    assert all(c.leaf.grad is not None for c in mw._copies.values())
    mw.zero_grad()
    step.optimizer.zero_grad(set_to_none=True)
    with mw.active():  # nothing left to move into p.grad
        pass
    assert all(p.grad is None for p in model.parameters())


def test_the_tuners_timed_forwards_do_not_use_the_copies(monkeypatch):
    # a decision measured inside a training forward (the stack's layout, a conv strategy) runs
    # its candidates with the copies paused: the training forward still gets them
    from faststeal.ops import tuning

    monkeypatch.setenv(tuning.ENV_TUNE, "1")
    seen = []
    monkeypatch.setattr(tuning, "measure", lambda cands, dev, budget: (
        seen.append(getattr(master_weights._active, "mw", "unset")), {n: 1.0 for n in cands})[1])
    model = build_model("mlp", (1, 4, 4), 3, members=2)
    mw = make_train_step(model, precision="bf16").master_weights
    with mw.active():
        tuning.decide("test.paused", "cpu", "one-shape", lambda: {"a": None, "b": None}, "a",
                      ("a", "b"))
        assert getattr(master_weights._active, "mw", None) is mw
    assert seen == [None]
