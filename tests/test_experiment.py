"""End-to-end comparison on the offline `digits` dataset, and configuration validation."""

import json
import os

import pytest

import faststeal
from faststeal.runs import Config, parse_methods

TINY = dict(dataset="digits", victim_arch="mlp", surrogate_arch="mlp", victim_epochs=15,
            budget=500, seeds=1, epochs=6, member_sweep=(1, 2), probe_size=64, record_every=5,
            progress=False)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = Config(**TINY, out=str(out), cache_dir=str(out / "cache"))
    summary = faststeal.run_comparison(cfg)
    return out, summary


def test_all_methods_far_above_chance(digits_run):
    out, summary = digits_run
    assert summary["victim"]["test_accuracy"] > 0.8
    assert set(summary["methods"]) == {"baseline", "deep-ensemble", "mc-dropout", "bbb", "swag",
                                       "laplace"}
    for name, m in summary["methods"].items():
        # chance is 10% on 10 classes
        assert m["fidelity"]["mean"] > 0.5, (name, m["fidelity"])
        assert m["fidelity"]["n"] == 1
    assert summary["methods"]["deep-ensemble"]["members"] > 1
    assert summary["methods"]["baseline"]["gain_over_baseline"]["mean"] == 0.0
    assert set(summary["member_sweep"]["deep-ensemble"]) == {"1", "2"}


def test_result_files_written(digits_run):
    out, _ = digits_run
    for f in ("results.sqlite", "results.json", "results.csv", "results.md", "query_log.json",
              "variance_curve.png", "fidelity.png", "fidelity_vs_members.png", "timing.json"):
        assert os.path.getsize(out / f) > 0, f
    res = json.loads((out / "results.json").read_text())
    assert res["queries"]["used"] == 500
    log = json.loads((out / "query_log.json").read_text())
    assert sum(entry["charged"] for entry in log["queries"]) == 500 == log["used"]


def test_rerun_resumes_without_retraining(digits_run, capsys):
    out, summary = digits_run
    cfg = Config(**TINY, out=str(out), cache_dir=str(out / "cache"))
    again = faststeal.run_comparison(cfg)
    assert "resuming" in capsys.readouterr().out
    assert again["methods"]["swag"]["fidelity"] == summary["methods"]["swag"]["fidelity"]


def test_rerun_after_a_crash_asks_the_victim_nothing(tmp_path, monkeypatch):
    """The budget is spent once, ever: a run that dies after querying is rerun, and the victim
    is not asked again (its answers come from OUT/answers.journal)."""
    from faststeal import attack, defenses

    calls = []
    wrap_victim = defenses.Defense.wrap_victim

    def counting_wrap(self, victim, victim_outputs="logits"):  # counts every oracle call
        served, kind = wrap_victim(self, victim, victim_outputs)
        return (lambda x: calls.append(int(x.shape[0])) or served(x)), kind

    def crash(*args, **kwargs):
        raise RuntimeError("killed after querying")

    monkeypatch.setattr(defenses.Defense, "wrap_victim", counting_wrap)
    train = attack.train_and_evaluate
    monkeypatch.setattr(attack, "train_and_evaluate", crash)
    cfg = Config(**{**TINY, "methods": ("baseline",), "member_sweep": (), "epochs": 1},
                 out=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="killed after querying"):
        faststeal.run_comparison(cfg)
    assert sum(calls) == 500
    monkeypatch.setattr(attack, "train_and_evaluate", train)
    calls.clear()
    summary = faststeal.run_comparison(cfg)
    assert calls == []  # no victim call at all on the rerun
    assert summary["queries"]["used"] == 500
    log = json.loads((tmp_path / "query_log.json").read_text())
    charged = [e["charged"] for e in log["queries"]]
    assert sum(charged) == 500 == log["used"] and charged[-1] == 0  # appended, not overwritten
    # another configuration in the same folder with --force: the old journal is set aside
    calls.clear()
    faststeal.run_comparison(Config(**{**cfg.__dict__, "output_mode": "probs", "force": True}))
    assert sum(calls) == 500 and list(tmp_path.glob("answers.journal.set-aside-*"))


@pytest.mark.parametrize("field,value,match", [
    ("dataset", "imagenet", "dataset must be one of"),
    ("victim_arch", "vgg", "victim_arch must be one of"),
    ("output_mode", "soft", "output_mode must be one of"),
    ("budget", 0, "budget must be a positive integer"),
    ("budget", -5, "budget must be a positive integer"),
    ("methods", ("baseline", "dropconnect"), "method must be one of"),
    ("victim_fraction", 1.5, "victim_fraction"),
    # before the run folder is touched (was: found after the victim had answered the queries)
    ("surrogate_arch", "torchvision:nope", "torchvision has no classification model 'nope'"),
    ("surrogate_arch", "nomodule_xyz:f", "cannot import module 'nomodule_xyz'"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        Config(**{field: value}).validate()


def test_budget_larger_than_pool_rejected_before_training(tmp_path):
    cfg = Config(**{**TINY, "budget": 10**6}, out=str(tmp_path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="larger than the attacker pool"):
        faststeal.run_comparison(cfg)
    assert not os.path.exists(tmp_path / "c")  # failed before the victim was trained


def test_surrogate_that_cannot_take_the_data_rejected_before_training(tmp_path, monkeypatch):
    (tmp_path / "revthief.py").write_text(
        "import torch\n"
        "def three():\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    cfg = Config(**{**TINY, "surrogate_arch": "revthief:three"}, out=str(out),
                 cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"num_classes=10\) logits; on 2 inputs it returned "
                                         r"\(2, 3\)"):
        faststeal.run_comparison(cfg)
    # failed before the victim was trained or queried, and before the folder was touched
    assert not os.path.exists(tmp_path / "c") and not out.exists()


def test_parse_methods():
    assert parse_methods("all")[0] == "baseline" and len(parse_methods("all")) == 6
    assert parse_methods("swag, laplace") == ("swag", "laplace")
    with pytest.raises(ValueError, match="unknown method"):
        parse_methods("swag,foo")


def test_defended_victim_comparison(tmp_path):
    """A defended victim: the attacker trains on rounded probabilities, fidelity is measured
    against the undefended victim, and the defence is recorded with its parameters."""
    cfg = Config(**{**TINY, "methods": ("baseline",), "member_sweep": (), "output_mode": "probs",
                    "defense": "rounding", "defense_params": {"decimals": 1}},
                 out=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    summary = faststeal.run_comparison(cfg)
    q = summary["queries"]
    assert q["defense"] == "rounding" and q["defense_params"]["decimals"] == 1
    assert q["refused"] is False and q["used"] == 500
    assert summary["methods"]["baseline"]["fidelity"]["mean"] > 0.5
    assert "kl" in summary["methods"]["baseline"]


def test_defense_validation():
    with pytest.raises(ValueError, match="defense must be one of"):
        Config(defense="firewall").validate()
    with pytest.raises(ValueError, match="not 'logits'"):
        Config(defense="top1", output_mode="logits").validate()


def test_one_method_registry_config_and_parse_methods_agree():
    from faststeal.methods import METHODS, PAPER_METHODS, REGISTRY, VARIANTS

    assert parse_methods("all") == PAPER_METHODS
    assert PAPER_METHODS == ("baseline", "deep-ensemble", "mc-dropout", "bbb", "swag", "laplace")
    assert set(VARIANTS) and not set(VARIANTS) & set(PAPER_METHODS)
    assert set(METHODS) == set(REGISTRY) == set(PAPER_METHODS) | set(VARIANTS)
    for name in METHODS:  # every registered name is accepted by both, or by neither
        assert parse_methods(name) == (name,)
        Config(methods=(name,)).validate()
    for bad in ("dropconnect", "Baseline"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_methods(bad)
        with pytest.raises(ValueError, match="method must be one of"):
            Config(methods=(bad,)).validate()


@pytest.mark.parametrize("params,exc,match", [
    ({"deep-ensemble": {"members": 0}}, ValueError, "members must be a positive integer"),
    ({"swag": {"rnak": 3}}, TypeError, r"unknown hyperparameter\(s\) \['rnak'\]"),
    ({"mc-dropout": {"dropout": 1.5}}, ValueError, "dropout"),
])
def test_method_param_values_checked_by_validate(params, exc, match):
    with pytest.raises(exc, match=match):
        Config(method_params=params).validate()


def test_sweep_needs_a_method_with_members():
    with pytest.raises(ValueError, match="no member count to sweep"):
        Config(sweep_method="baseline", member_sweep=(1, 2)).validate()
    Config(sweep_method="baseline", member_sweep=()).validate()


def test_presets_fit_the_small_offline_datasets():
    """`faststeal run --dataset digits` (default preset, budget 10,000) must fit digits' pool of
    719 images: the presets' budget is capped per dataset; an explicit budget is kept."""
    from faststeal.data import DATASET_INFO

    for preset in ("quick", "default", "full"):
        cfg = Config.from_preset(preset, dataset="digits").validate()
        assert cfg.budget == DATASET_INFO["digits"].max_preset_budget == 600
        assert Config.from_preset(preset, dataset="mnist5k").budget == 1500
    assert Config.from_preset("default").budget == 10000  # fashion-mnist: unchanged
    assert Config.from_preset("quick", dataset="digits", budget=700).budget == 700
