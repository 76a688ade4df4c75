"""The command line: errors on bad configuration, info, report."""

import re
import subprocess
import sys

import pytest

from faststeal.cli import main


@pytest.mark.parametrize("args,match", [
    (["--dataset", "imagenet"], "dataset must be one of"),
    (["--budget", "0"], "budget must be a positive integer"),
    (["--methods", "swag,foo"], "unknown method"),
    (["--victim-arch", "vgg"], "victim_arch must be one of"),
    (["--member-sweep", "1,x"], "--member-sweep must be"),
    (["--method-params", "{bad"], "--method-params is not valid JSON"),
    (["--device", "tpu"], "device must be"),
    (["--member-chunk", "0"], "--member-chunk must be a positive integer or 'auto'"),
    (["--member-chunk", "half"], "--member-chunk must be a positive integer or 'auto'"),
])
def test_run_rejects_bad_configuration(args, match, capsys, tmp_path):
    rc = main(["run", "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    assert match in capsys.readouterr().err


def test_bad_output_mode_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--output-mode", "soft"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_study_help_gives_each_study_its_whole_question(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    # was the docstring's first line only, cut mid-sentence
    assert "does choosing queries with the surrogate's own uncertainty beat random queries" in out
    assert "what do the usual oracle defences cost each method?" in out


def _info_rows(out):
    """{op: backend} of the `cpu` rows of `faststeal info`."""
    return dict(re.findall(r"^  cpu +(\S+) +(\S+)", out, re.M))


def test_info_lists_backends_per_op(capsys, monkeypatch):
    import torch

    from faststeal import _ext
    from faststeal.ops import dispatch

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^torch +{re.escape(torch.__version__)}$", out, re.M)
    rows = _info_rows(out)
    assert rows == {op: dispatch.resolve(op, "cpu") for op in dispatch.OPS}
    # the rows report the state, not a fixed text: without the extension nothing runs on `cpp`
    monkeypatch.setattr(_ext, "C", None)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "ImportError: hidden by the test")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^extension +not loaded: ImportError: hidden by the test$", out, re.M)
    rows = _info_rows(out)
    assert rows == {op: "reference" for op in dispatch.OPS}
    assert "skipped cpp: faststeal._C is not loaded (ImportError: hidden by the test)" in out


def test_info_reports_the_cpu_settings(capsys, monkeypatch):
    monkeypatch.setenv("FASTSTEAL_RETAIN_CPU_MEMORY", "0")
    monkeypatch.setenv("FASTSTEAL_CPU_GEMM", "bmm")
    monkeypatch.setenv("FASTSTEAL_TUNE", "0")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu_retain_freed_memory  off (FASTSTEAL_RETAIN_CPU_MEMORY=0)" in out
    # the forced GEMM path is the only cpp candidate of the GEMM ops; tuning is reported off
    assert ("cpu   ensemble_linear          cpp:bmm  (default; auto measures cpp:bmm, reference)"
            in out)
    assert "tuning                   off (FASTSTEAL_TUNE=0)" in out


def test_report_on_missing_folder(capsys, tmp_path):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.sqlite" in capsys.readouterr().err


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "faststeal", "info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "backend used by `auto`" in r.stdout


def test_download_flag_reaches_the_data_loader(monkeypatch, capsys, tmp_path):
    import faststeal.data

    def fake_make_splits(*args, **kwargs):
        raise ValueError(f"stopped here with download={kwargs.get('download')}")

    monkeypatch.setattr(faststeal.data, "make_splits", fake_make_splits)
    args = ["run", "--dataset", "mnist", "--no-progress", "--out", str(tmp_path / "o")]
    assert main([*args, "--download"]) == 2
    assert "stopped here with download=True" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "o2")]) == 2
    assert "stopped here with download=False" in capsys.readouterr().err


def test_import_extension_before_torch():
    pytest.importorskip("faststeal._C")  # not built here: nothing to check
    code = "import faststeal._C; import torch; print(faststeal._C.__name__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "faststeal._C" in r.stdout, r.stderr[-2000:]
