"""User surrogates through every method and entry point; the StolenModel result."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import faststeal
from faststeal.attack import random_queries
from faststeal.methods import METHODS, build_method, check_method_params, parse_methods
from faststeal.models import check_surrogate_name, resolve_surrogate
from faststeal.stolen import StolenModel
from runstore import finished_at
from toydata import prototype_data

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ["baseline", "deep-ensemble", "mc-dropout", "bbb", "swag", "laplace"]
SMALL = {"deep-ensemble": {"members": 3}, "mc-dropout": {"members": 3}, "bbb": {"members": 3},
         "swag": {"members": 3, "rank": 2, "collect_every": 1}, "laplace": {"members": 3}}


class MyNet(nn.Module):
    """A user's thief CNN for 8x8 images (functional style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(self.drop(F.relu(self.fc1(x.view(x.size(0), -1)))))


class Tabular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize("name", ALL)
def test_every_method_takes_a_user_surrogate(name):
    x, y = prototype_data(48, 0)
    m = build_method(name, surrogate=MyNet, input_shape=(1, 8, 8), num_classes=10, seed=1,
                     **SMALL.get(name, {}))
    m.fit(x.numpy(), y.numpy(), epochs=1, batch_size=16, progress=False)  # numpy accepted
    p = m.predict_proba(x[:5])
    assert m.predict_members(x[:5]).shape == (SMALL.get(name, {}).get("members", 1), 5, 10)
    torch.testing.assert_close(p.sum(-1), torch.ones(5))
    assert m.hparams()["arch"] == "custom:MyNet"


def test_tabular_surrogate_and_template_module():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    m = build_method("deep-ensemble", surrogate=Tabular(), input_shape=(6,), num_classes=3,
                     members=2)
    m.fit(x, y, epochs=2, batch_size=16, progress=False)
    assert m.predict_members(x).shape == (2, 60, 3)


def test_member_count_is_members_everywhere():
    for name in ALL[1:]:
        assert "members" in METHODS[name].DEFAULTS, name
    with pytest.warns(DeprecationWarning, match="'samples' is now 'members'"):
        m = build_method("mc-dropout", "mlp", (1, 8, 8), 10, samples=4)
    assert m.num_members == 4


def test_mc_dropout_needs_dropout_or_inserts_it():
    with pytest.raises(ValueError, match="has no dropout layer"):
        build_method("mc-dropout", surrogate=Tabular, input_shape=(6,), num_classes=3)
    m = build_method("mc-dropout", surrogate=Tabular, input_shape=(6,), num_classes=3,
                     dropout=0.3, members=3)
    assert isinstance(m.model.body.fc2[0], nn.Dropout) or "Dropout" in type(
        m.model.body.fc2[0]).__name__
    x = torch.randn(4, 6)
    p = m.predict_members(x)
    assert not torch.equal(p[0], p[1])


class PostScaled(Tabular):
    def forward(self, x):
        return 2.0 * super().forward(x)


def test_laplace_last_layer_checks():
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    m = build_method("laplace", surrogate=PostScaled, input_shape=(6,), num_classes=3, members=2)
    with pytest.raises(ValueError, match="does not produce the surrogate's output"):
        m.fit(x, y, epochs=1, batch_size=20, progress=False)
    with pytest.raises(ValueError, match="last_layer 'fc3' is not a submodule"):
        build_method("laplace", surrogate=Tabular, input_shape=(6,), num_classes=3,
                     last_layer="fc3")
    m = build_method("laplace", surrogate=Tabular, input_shape=(6,), num_classes=3,
                     last_layer="fc2", members=2)
    m.fit(x, y, epochs=1, batch_size=20, progress=False)
    # a zoo name is stacked like any user model: its last layer can be named too
    xi, yi = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    m = build_method("laplace", "mlp", (1, 8, 8), 10, last_layer="head", members=2)
    m.fit(xi, yi, epochs=1, batch_size=20, progress=False)
    assert m.model.last_layer == "head"
    m = build_method("laplace", "mlp", (1, 8, 8), 10, last_layer="body.3", members=2)
    with pytest.raises(ValueError, match="does not produce the surrogate's output"):
        m.fit(xi, yi, epochs=1, batch_size=20, progress=False)


def test_resolve_surrogate_forms_and_errors(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    s = resolve_surrogate("torchvision:resnet18", (3, 32, 32), 10)
    assert s.recipe == "torchvision:resnet18" and s.plain().fc.out_features == 10
    (tmp_path / "mythief.py").write_text(
        "import torch\n"
        "def build(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(),\n"
        "        torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    s = resolve_surrogate("mythief:build", (1, 8, 8), 10)
    assert s.plain()[1].in_features == 64
    check_surrogate_name("mythief:build")
    with pytest.raises(ValueError, match="torchvision has no classification model 'nope'"):
        resolve_surrogate("torchvision:nope", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="cannot import module 'nomodule_xyz'"):
        resolve_surrogate("nomodule_xyz:f", (3, 8, 8), 10)
    with pytest.raises(ValueError, match="unknown surrogate 'vgg'"):
        resolve_surrogate("vgg", (3, 8, 8), 10)
    with pytest.raises(ValueError, match=r"returned \(2, 3\)"):
        resolve_surrogate(Tabular, (6,), 10)
    with pytest.raises(ValueError, match="cannot run on inputs of shape"):
        resolve_surrogate(Tabular, (5,), 3)
    with pytest.raises(TypeError, match="surrogate must be a zoo name"):
        resolve_surrogate(3.0, (6,), 3)
    with pytest.raises(ValueError, match="input_shape must be"):
        resolve_surrogate(Tabular, (0,), 3)
    with pytest.raises(ValueError, match="surrogate_arch must be one of"):
        check_surrogate_name("vgg", "surrogate_arch")
    with pytest.raises(TypeError, match="give the surrogate once"):
        build_method("baseline", "mlp", (1, 8, 8), 10, surrogate=MyNet)
    with pytest.raises(ValueError, match="hetero-ensemble mixes zoo architectures"):
        build_method("hetero-ensemble", surrogate=MyNet, input_shape=(1, 8, 8), num_classes=10)
    sys.modules.pop("mythief", None)


def test_method_params_and_methods_validation():
    assert tuple(parse_methods("all")) == tuple(ALL)
    assert tuple(parse_methods("baseline, swag")) == ("baseline", "swag")
    with pytest.raises(ValueError, match=r"unknown method\(s\) \[.dropout.\]"):
        parse_methods(["dropout"])
    with pytest.raises(ValueError, match="method_params key must be one of"):
        check_method_params({"nope": {}})
    with pytest.raises(TypeError, match=r"method_params\['swag'\] must be a dict"):
        check_method_params({"swag": 3})
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['membrs'\]"):
        check_method_params({"swag": {"membrs": 3}})


def _digits_problem():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x))
    vic, pool, test = perm[:600], perm[600:1400], perm[1400:]
    victim = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(victim.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(victim(x[vic]), y[vic]).backward()
        opt.step()
    return victim.eval(), x[pool], (x[test], y[test])


def _plain_fidelity(victim, pool_x, test_x, budget, seed, epochs, lr=1e-3, batch=128):
    """The same architecture trained by plain PyTorch on the same queries and answers."""
    idx = random_queries(len(pool_x), budget, 0)
    xq = pool_x[idx]
    with torch.no_grad():
        yq = victim(xq).argmax(-1)
        vt = victim(test_x).argmax(-1)
    torch.manual_seed(1000 + seed)
    net = MyNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(xq), generator=g)
        for s in range(0, len(xq), batch):
            b = perm[s:s + batch]
            if len(b) < 2:
                continue
            opt.zero_grad()
            F.cross_entropy(net(xq[b]), yq[b]).backward()
            opt.step()
    with torch.no_grad():
        return float((net.eval()(test_x).argmax(-1) == vt).float().mean())


def test_steal_with_own_surrogate_matches_plain_pytorch():
    """README "Steal with your own surrogate": methods="all" on a user CNN returns StolenModels,
    and the single surrogate's fidelity matches plain PyTorch training of the same
    architecture on the same queries within seed noise."""
    victim, pool_x, test = _digits_problem()
    budget, epochs, seeds = 500, 8, [0, 1, 2]
    res = faststeal.steal(victim, pool=pool_x, test=test, budget=budget, surrogate=MyNet,
                          methods="all", seeds=seeds[:1], epochs=2, progress=False,
                          method_params=SMALL)
    assert set(res["results"]) == set(ALL)
    for name in ALL:
        assert isinstance(res.stolen(name), StolenModel)
        assert 0.0 <= res["results"][name][0]["fidelity"] <= 1.0
    base = faststeal.steal(victim, pool=pool_x, test=test, budget=budget, surrogate=MyNet,
                           seeds=seeds, epochs=epochs, progress=False, keep_models=False)
    ours = np.array([r["fidelity"] for r in base["results"]["baseline"]])
    plain = np.array([_plain_fidelity(victim, pool_x, test[0], budget, s, epochs)
                      for s in seeds])
    noise = max(plain.std(), ours.std(), 0.01)
    assert abs(ours.mean() - plain.mean()) <= 3 * noise + 0.01, (ours, plain)
    assert ours.mean() > 0.6


def test_stolen_model_api(tmp_path):
    x, y = prototype_data(64, 0)
    for name in ["deep-ensemble", "mc-dropout", "laplace"]:
        m = build_method(name, surrogate=MyNet, input_shape=(1, 8, 8), num_classes=10, seed=2,
                         **SMALL[name]).fit(x, y, epochs=1, batch_size=16, progress=False)
        sm = StolenModel(m)
        xs = x[:6].clone().requires_grad_(True)
        p = sm(xs)
        assert p.shape == (6, 10)
        p[:, 0].sum().backward()  # differentiable in x (adversarial attacks)
        assert xs.grad is not None and xs.grad.abs().sum() > 0
        u = sm.uncertainty(x[:6].numpy())
        assert set(u) == {"variance", "entropy", "mutual_info", "disagreement"}
        assert u["variance"].shape == (6,)
        sm.save(tmp_path / f"{name}.pt")
        back = faststeal.load(tmp_path / f"{name}.pt")
        assert torch.equal(back.predict_members(x), sm.predict_members(x))
        torch.testing.assert_close(back(x), sm(x))
        if name == "deep-ensemble":
            mem = sm.members()
            assert len(mem) == 3 and all(type(k) is MyNet for k in mem)
            with torch.no_grad():
                torch.testing.assert_close(mem[1].eval()(x), sm.predict_members(x)[1],
                                           atol=1e-5, rtol=1e-5)
        else:
            with pytest.raises(ValueError, match="draws its members at prediction time"):
                sm.members()
    with pytest.raises(ValueError, match="not fitted"):
        StolenModel(build_method("baseline", "mlp", (1, 8, 8), 10))
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"a": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="is not a faststeal stolen model"):
        faststeal.load(tmp_path / "junk.pt")
    lam = build_method("baseline", surrogate=lambda: MyNet(), input_shape=(1, 8, 8),
                       num_classes=10).fit(x, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="cannot save the surrogate"):
        StolenModel(lam).save(tmp_path / "lam.pt")
    assert not list(tmp_path.glob("lam.pt*"))  # nothing half-written left behind


def test_steal_options_reach_the_oracle_and_strategies():
    x, y = prototype_data(300, 0)
    victim = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = faststeal.steal(victim, pool=x[:200], test=(x[200:], y[200:]), budget=60,
                              surrogate="mlp", methods="baseline", epochs=1, progress=False,
                              query="entropy", query_method="baseline",
                              query_params={"candidates": 100}, output_mode="topk", topk=2,
                              defense="noise", defense_params={"sigma": 0.01})
        # rounded probabilities sum to 1 only within C * 0.5 * 10**-d: steal() must give the
        # oracle the defence's tolerance (was a VictimOutputError: 'not probabilities')
        rounded = faststeal.steal(victim, pool=x[:200], test=(x[200:], y[200:]), budget=30,
                                  methods="baseline", epochs=1, progress=False,
                                  output_mode="probs", defense="rounding",
                                  defense_params={"decimals": 1})
    assert res["queries"]["used"] == 60
    assert rounded["queries"]["used"] == 30 and not rounded["queries"]["refused"]
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        faststeal.steal(victim, pool=x, test=x, budget=10, method_params={"swag": {"x": 1}})
    with pytest.raises(ValueError, match="swag: members must be a positive integer, got 0"):
        faststeal.steal(victim, pool=x, test=x, budget=10, methods="swag",
                        method_params={"swag": {"members": 0}})
    with pytest.raises(ValueError, match="output_mode must be one of"):
        faststeal.steal(victim, pool=x, test=x, budget=10, output_mode="soft")
    with pytest.raises(TypeError, match="not both"):
        faststeal.steal(victim, pool=x, test=x, budget=10, surrogate="mlp",
                        surrogate_arch="mlp")
    # rejected before the victim sees anything (were found after the budget was spent, or, for
    # seeds=0, not at all: an empty result)
    counted = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    seen = []
    counted.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
    for kw, exc, match in [
            (dict(seeds=0), ValueError, "seeds must be a positive integer, got 0"),
            (dict(seeds=[]), ValueError, "seeds must be a positive int or a non-empty list"),
            (dict(epochs=0), ValueError, "epochs must be a positive integer, got 0"),
            (dict(batch_size=0), ValueError, "batch_size must be a positive integer, got 0"),
            (dict(query="k-center"), ValueError, "strategy must be one of"),
            (dict(query="entropy", query_params={"nope": 1}), TypeError, "nope"),
            (dict(query="entropy", query_method="nope"), ValueError, "unknown method"),
            (dict(surrogate="vgg"), ValueError, "surrogate must be one of"),
            (dict(surrogate="torchvision:nope"), ValueError, "no classification model 'nope'")]:
        with pytest.raises(exc, match=match):
            faststeal.steal(counted, pool=x[:200], test=(x[200:], y[200:]), budget=10,
                            progress=False, **kw)
    assert seen == []


def test_cli_user_surrogate_and_save_models(tmp_path, monkeypatch, capsys):
    """`faststeal run --surrogate-arch module:factory --save-models` writes loadable models."""
    from faststeal import cli

    (tmp_path / "thiefnets.py").write_text(
        "import torch\n"
        "def small(input_shape, num_classes):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(32, num_classes))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    rc = cli.main(["run", "--dataset", "digits", "--victim-arch", "mlp", "--victim-epochs", "3",
                   "--surrogate-arch", "thiefnets:small", "--methods", "baseline,deep-ensemble",
                   "--budget", "200", "--seeds", "1", "--epochs", "2", "--member-sweep", "",
                   "--method-params", '{"deep-ensemble": {"members": 2}}', "--save-models",
                   "--no-progress", "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    files = sorted(p.name for p in (out / "models").glob("*.pt"))
    assert any("deep-ensemble" in f for f in files) and any("baseline" in f for f in files)
    sm = faststeal.load(out / "models" / next(f for f in files if "deep-ensemble" in f))
    assert sm.num_members == 2 and sm.method.arch == "thiefnets:small"
    capsys.readouterr()
    assert cli.main(["run", "--surrogate-arch", "vgg", "--out", str(tmp_path / "x")]) != 0
    assert "surrogate_arch must be one of" in capsys.readouterr().err
    sys.modules.pop("thiefnets", None)


# ------------------------------------------------------------------ run_comparison and the studies

class WidthNet(nn.Module):
    """A user's CNN for 8x8 digits whose hidden width is an argument (module level: picklable)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def width_net_factory() -> nn.Module:
    return WidthNet(12)


RUN = dict(dataset="digits", victim_arch="mlp", victim_epochs=15, budget=200, seeds=1, epochs=3,
           methods=("deep-ensemble",), method_params={"deep-ensemble": {"members": 2}},
           member_sweep=(), probe_size=64, record_every=5, lr=1e-2, progress=False)


@pytest.fixture(scope="module")
def victim_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("victims"))


def test_surrogate_key_is_the_architecture():
    from faststeal.models import surrogate_key, surrogate_label

    key = surrogate_key(WidthNet())
    assert key.startswith("custom:WidthNet@") and surrogate_label(key) == "custom:WidthNet"
    other = WidthNet()
    with torch.no_grad():
        other.fc1.weight.add_(1.0)  # weights are not the architecture: members re-initialise
    assert surrogate_key(other) == key
    assert surrogate_key(WidthNet(32)) != key
    # two factories with one qualname and one code differ by the model they build
    def maker(width):
        def factory():
            return WidthNet(width)
        return factory
    assert surrogate_label(maker(16)) == surrogate_label(maker(24))
    assert surrogate_key(maker(16)) != surrogate_key(maker(24))
    assert surrogate_key(maker(16)) == surrogate_key(maker(16))
    assert surrogate_label(width_net_factory) == "custom:width_net_factory"
    assert surrogate_key("lenet") == "lenet"  # named surrogates hash as before
    # a new process (a resumed run) computes the same key for the same code
    code = ("import sys; sys.path[:0] = ['tests']; from test_surrogate import WidthNet; "
            "from faststeal.models import surrogate_key; print(surrogate_key(WidthNet()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == key


class Comprehending(nn.Module):
    """__init__ with a comprehension (a nested code object) and forward with a set constant."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.mode = "a"

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x * 2 if self.mode in {"a", "b", "c"} else x


def test_surrogate_key_without_source_is_the_same_in_every_process():
    # bytecode, not source (a notebook): nested code objects and set constants must not bring
    # file names, line numbers or hash-seed-dependent orders into the key
    code = ("import sys; sys.path[:0] = ['tests']; from test_surrogate import Comprehending; "
            "from faststeal.models import surrogate; surrogate._source = lambda obj: ''; "
            "print(surrogate.surrogate_key(Comprehending()))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                           check=True, env={**os.environ, "PYTHONHASHSEED": seed}
                           ).stdout.strip().splitlines()[-1] for seed in ("1", "2", "3")}
    assert len(keys) == 1


class Flagged(nn.Module):
    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual  # read by forward, invisible in repr
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) + x if self.residual else self.fc(x)


def test_surrogate_key_sees_flags_and_code_without_source(monkeypatch):
    from faststeal.models import surrogate, surrogate_key

    assert surrogate_key(Flagged(True)) != surrogate_key(Flagged(False))

    def fwd2(self, x):
        return self.fc(x) * 2

    def fwd3(self, x):
        return self.fc(x) * 3
    fwd3.__qualname__ = fwd2.__qualname__
    # two classes named Net whose forwards differ only in a constant, with no source to read
    a = type("Net", (Flagged,), {"forward": fwd2})
    b = type("Net", (Flagged,), {"forward": fwd3})
    monkeypatch.setattr(surrogate, "_source", lambda obj: "")  # a notebook: no source
    assert surrogate_key(a(False)) != surrogate_key(b(False))


def test_config_hash_never_deep_copies_the_template():
    from faststeal.runs import Config

    class NoCopy(WidthNet):
        def __deepcopy__(self, memo):
            raise AssertionError("the template was deep-copied")

    d = Config(surrogate_arch=NoCopy()).result_affecting()
    assert d["surrogate_arch"].startswith("custom:NoCopy@")
    import json

    json.dumps(d)


def test_run_comparison_with_a_user_module(tmp_path, victim_cache, capsys):
    """Config(surrogate_arch=<nn.Module>): trained with that model, named in the results, saved;
    the same architecture (a new instance) resumes every cell; another width is refused."""
    from faststeal.results.store import StoreMismatchError
    from faststeal.runs import Config

    out = tmp_path / "run"
    cfg = Config(**RUN, surrogate_arch=WidthNet(), save_models=True, out=str(out),
                 cache_dir=victim_cache)
    summary = faststeal.run_comparison(cfg)
    assert set(summary["methods"]) == {"baseline", "deep-ensemble"}
    for m in summary["methods"].values():
        assert m["hparams"]["arch"] == "custom:WidthNet"
        assert m["fidelity"]["mean"] > 0.2  # chance is 0.1
    assert summary["config"]["surrogate_arch"].startswith("custom:WidthNet@")
    assert "Surrogate: `custom:WidthNet`" in (out / "results.md").read_text()
    import json

    assert json.loads((out / "results.json").read_text())["methods"]["deep-ensemble"]
    stolen = faststeal.load(out / "models" / "main_deep-ensemble_seed=0.pt")
    members = stolen.members()
    assert len(members) == 2 and all(type(m) is WidthNet for m in members)
    assert members[0].fc1.out_features == 16

    before = finished_at(out)
    capsys.readouterr()
    again = faststeal.run_comparison(Config(**RUN, surrogate_arch=WidthNet(), out=str(out),
                                            cache_dir=victim_cache))
    assert "resuming: 2 finished cells kept, 0 to run" in capsys.readouterr().out
    assert finished_at(out) == before  # no cell retrained
    assert again["methods"]["deep-ensemble"]["fidelity"] == \
        summary["methods"]["deep-ensemble"]["fidelity"]
    with pytest.raises(StoreMismatchError, match="another configuration"):
        faststeal.run_comparison(Config(**RUN, surrogate_arch=WidthNet(32), out=str(out),
                                        cache_dir=victim_cache))
    assert finished_at(out) == before


def test_run_comparison_with_a_user_factory(tmp_path, victim_cache, capsys):
    from faststeal.runs import Config

    out = tmp_path / "run"
    cfg = dict(RUN, surrogate_arch=width_net_factory, out=str(out), cache_dir=victim_cache)
    summary = faststeal.run_comparison(Config(**cfg))
    assert summary["methods"]["deep-ensemble"]["hparams"]["arch"] == "custom:width_net_factory"
    assert summary["methods"]["deep-ensemble"]["members"] == 2
    before = finished_at(out)
    capsys.readouterr()
    faststeal.run_comparison(Config(**cfg))
    assert "0 to run" in capsys.readouterr().out and finished_at(out) == before


def test_config_and_study_surrogate_type_errors():
    from faststeal.runs import Config, DiversitySettings

    with pytest.raises(TypeError, match="surrogate_arch must be a zoo name.*got int"):
        Config(surrogate_arch=3).validate()
    with pytest.raises(TypeError, match="arch must be a zoo name.*got int"):
        DiversitySettings(arch=3).validate()
    with pytest.raises(ValueError, match="hetero-ensemble .* does not take a user surrogate"):
        DiversitySettings(arch=WidthNet(), variants=("hetero-ensemble",)).validate()

    class Local(WidthNet):  # not importable: the saved models could not be loaded
        pass

    with pytest.raises(ValueError, match="save_models: surrogate_arch custom:Local cannot be"):
        Config(surrogate_arch=Local(), save_models=True).validate()


def test_diversity_study_with_a_user_module(tmp_path, victim_cache):
    from faststeal.runs import DiversitySettings, DiversityStudy, run_study

    s = DiversitySettings(dataset="digits", victim_arch="mlp", victim_epochs=15, seeds=1,
                          members=2, epochs=3, lr=1e-2, probe_size=64, arch=WidthNet(),
                          variants=("deep-ensemble", "ncl-ensemble"), budget=200,
                          record_every=2, progress=False, out=str(tmp_path / "div"),
                          cache_dir=victim_cache)
    summary = run_study(DiversityStudy(s))
    assert summary["settings"]["arch"].startswith("custom:WidthNet@")
    assert summary["table"]["ncl-ensemble"]["fidelity"]["mean"] > 0.2
    assert "S=2 custom:WidthNet members" in (tmp_path / "div" / "results.md").read_text()
    from faststeal.results import ResultStore

    store = ResultStore(str(tmp_path / "div"))
    try:
        assert {c["hparams"]["arch"] for c in store.cells("diversity")} == {"custom:WidthNet"}
    finally:
        store.close()
