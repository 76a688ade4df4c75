"""faststeal.train_step: the loss is the sum of per-member losses, one step equals S separate
Adam steps, and the CUDA-graph option refuses what it cannot replay."""

import pytest
import torch
import torch.nn.functional as F

from faststeal.models import build_model
from faststeal.train_step import ensemble_loss, make_optimizer, make_train_step


def test_ensemble_loss_matches_per_member_cross_entropy(seed_all):
    s, b, c = 3, 7, 5
    logits = torch.randn(s, b, c) * 3
    shared = torch.randint(0, c, (b,))
    per = torch.randint(0, c, (s, b))
    soft = torch.softmax(torch.randn(s, b, c), -1)
    want_shared = sum(F.cross_entropy(logits[i], shared) for i in range(s))
    want_per = sum(F.cross_entropy(logits[i], per[i]) for i in range(s))
    want_soft = sum(F.cross_entropy(logits[i], soft[i]) for i in range(s))
    torch.testing.assert_close(ensemble_loss(logits, shared), want_shared)
    torch.testing.assert_close(ensemble_loss(logits, per), want_per)
    torch.testing.assert_close(ensemble_loss(logits, soft), want_soft)
    with pytest.raises(ValueError, match="per-member target"):
        ensemble_loss(logits, torch.randint(0, c, (s + 1, b)))


def test_one_step_equals_separate_adam_steps(seed_all):
    s, b = 3, 6
    model = build_model("mlp", (1, 8, 8), 4, members=s)
    plain = [model.member(i) for i in range(s)]
    x = torch.randn(s, b, 1, 8, 8)
    y = torch.randint(0, 4, (s, b))
    step = make_train_step(model, make_optimizer(model.parameters(), lr=1e-2))
    loss = step(x, y)
    assert loss.dim() == 0 and not loss.requires_grad
    for i, m in enumerate(plain):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        F.cross_entropy(m(x[i]), y[i]).backward()
        opt.step()
        got = model.member(i)
        for p_want, p_got in zip(m.parameters(), got.parameters()):
            # Adam's first step is lr * g / (|g| + eps): where |g| ~ eps, float rounding of the
            # gradient shows at ~1e-3 of lr, so compare at that scale
            torch.testing.assert_close(p_got, p_want, rtol=1e-5, atol=1e-4)


def test_make_optimizer_prefers_fused_and_falls_back():
    p = [torch.nn.Parameter(torch.randn(3, 3))]
    opt = make_optimizer(p, lr=1e-3)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    with pytest.raises(ValueError, match="kind must be one of"):
        make_optimizer(p, kind="lbfgs")


def test_cuda_graph_needs_a_cuda_model():
    model = build_model("mlp", (1, 8, 8), 4, members=2)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        make_train_step(model, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_step_matches_eager(seed_all):
    s, b = 4, 16
    eager_model = build_model("mlp", (1, 8, 8), 4, members=s).cuda()
    graph_model = build_model("mlp", (1, 8, 8), 4, members=s).cuda()
    graph_model.load_state_dict(eager_model.state_dict())
    eager = make_train_step(eager_model, lr=1e-2)
    graphed = make_train_step(graph_model, lr=1e-2, cuda_graph=True)
    for _ in range(3):
        x = torch.randn(s, b, 1, 8, 8, device="cuda")
        y = torch.randint(0, 4, (s, b), device="cuda")
        torch.testing.assert_close(graphed(x, y).clone(), eager(x, y), rtol=1e-4, atol=1e-5)
    for pe, pg in zip(eager_model.parameters(), graph_model.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fixed random seed"):
        make_train_step(build_model("mlp", (1, 8, 8), 4, members=2, dropout=0.1).cuda(),
                        cuda_graph=True)


_FAULTS_SCRIPT = r"""
import os, resource, sys, torch
from faststeal import train_step
applied = train_step.retain_freed_cpu_memory() if sys.argv[1] == "retain" else False
for _ in range(20):  # first touches fault in either case (and glibc's heap settles)
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):  # a 64 MB block freed and allocated again, as a step's gradients are
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env) -> tuple[bool, int]:
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], check=True,
                         capture_output=True, text=True, env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc mallopt")
def test_retain_freed_cpu_memory_removes_page_faults_of_reallocation():
    retained, faults = _faults("retain")
    if not retained:
        pytest.skip("mallopt unavailable (not glibc)")
    _, faults_default = _faults("default")
    # default glibc unmaps the 64 MB block on free: 16,384 zero-filled pages per reallocation
    assert faults_default > 5 * 10_000, faults_default
    assert faults < faults_default / 20, (faults, faults_default)
    # the opt-out leaves malloc alone
    assert _faults("retain", FASTSTEAL_RETAIN_CPU_MEMORY="0")[0] is False


def test_retain_freed_cpu_memory_rejects_a_bad_limit(monkeypatch):
    from faststeal import train_step
    monkeypatch.setattr(train_step, "_retained", None)
    for bad in (0, -5, 1.5, True, "1G"):
        with pytest.raises(ValueError, match="max_block_bytes"):
            train_step.retain_freed_cpu_memory(bad)


def test_precision_is_validated_everywhere_it_enters():
    from faststeal import steal
    from faststeal.runs import Config
    from faststeal.models import build_model
    from faststeal.train_step import check_precision, make_train_step

    assert check_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        check_precision("fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        make_train_step(build_model("mlp", (1, 4, 4), 3, members=2), precision="half")
    with pytest.raises(ValueError, match="precision must be one of"):
        Config(precision="bfloat16").validate()
    with pytest.raises(ValueError, match="precision must be one of"):
        steal(lambda x: torch.zeros(len(x), 3), torch.zeros(8, 1, 4, 4), torch.zeros(4, 1, 4, 4),
              4, precision="int8")


def test_bf16_step_keeps_fp32_master_weights_and_loss(seed_all):
    # bf16 compute, float32 parameters / Adam state / loss; the step still learns
    from faststeal.models import build_model

    model = build_model("mlp", (1, 8, 8), 4, members=3)
    step = make_train_step(model, lr=1e-2, precision="bf16")
    x, y = torch.randn(3, 32, 1, 8, 8), torch.randint(0, 4, (3, 32))
    first = float(step(x, y))
    for _ in range(30):
        loss = step(x, y)
    assert loss.dtype == torch.float32 and float(loss) < first
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for st in step.optimizer.state.values()
               for k, v in st.items() if k != "step")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_arithmetic_warns_once(monkeypatch, native):
    # precision="bf16" where oneDNN says the CPU has no bfloat16 arithmetic: one RuntimeWarning
    # per process saying it is slower than fp32 here; none where the CPU has it, none for fp32
    import warnings

    from faststeal import train_step
    from faststeal.models import build_model
    from faststeal.ops import cpp_backend

    monkeypatch.setattr(cpp_backend, "onednn_multiplies", lambda dtype: native)
    monkeypatch.setattr(train_step, "_warned_no_bf16", False)
    model = build_model("mlp", (1, 8, 8), 4, members=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        make_train_step(model, lr=1e-2)
        make_train_step(model, lr=1e-2, precision="bf16")
        make_train_step(model, lr=1e-2, precision="bf16")
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)
            and "no bfloat16 arithmetic" in str(w.message)]
    assert len(msgs) == (0 if native else 1)
