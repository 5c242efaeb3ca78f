"""The CLI end to end: compile → export → inspect, and its error path."""
import os
import subprocess
import sys

import pytest

from fxpress.cli import main, parse_input_spec
from fxpress.errors import InputError


def test_compile_export_inspect(tmp_path, capsys):
    out = str(tmp_path / "art")
    assert main(["compile", "digits_cnn", "--passes", "none", "--target", "onnx", "--out", out]) == 0
    text = capsys.readouterr().out
    assert "stage" in text and "lower:onnx" in text and "exported to" in text
    assert os.path.isfile(os.path.join(out, "manifest.json"))
    assert main(["inspect", out]) == 0
    text = capsys.readouterr().out
    assert "artifact" in text and "trace" in text
    assert main(["inspect", out, "--stage", "trace"]) == 0
    assert "def forward" in capsys.readouterr().out


def test_module_factory_with_input(tmp_path, capsys):
    mod = tmp_path / "mynet.py"
    mod.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.ReLU())\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["compile", "mynet:build", "--input", "4x6", "--passes", "none", "--target", "llvm"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert "lower:llvm" in capsys.readouterr().out


def test_bad_model_reference_is_a_clean_error(capsys):
    assert main(["compile", "no_such_model", "--target", "torch"]) == 2
    err = capsys.readouterr().err
    assert "fxpress: error: model 'no_such_model' is neither a registry name" in err


def test_input_spec_parsing():
    assert tuple(parse_input_spec("2x3").shape) == (2, 3)
    assert str(parse_input_spec("2x16:int64").dtype) == "torch.int64"
    with pytest.raises(InputError, match="unknown dtype"):
        parse_input_spec("2x3:complex")
    with pytest.raises(InputError, match="expected dimensions"):
        parse_input_spec("axb")


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "fxpress")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "compile" in r.stdout


def test_bench_titles_registry_model_by_its_name(tmp_path, monkeypatch, capsys):
    import fxpress.bench as bench

    real = bench.bench_model
    # Only the eager peer and no fxpress target: the title is under test, not the timings.
    monkeypatch.setattr(bench, "bench_model",
                        lambda *a, **k: real(*a, **{**k, "targets": (), "peers": ("eager",)}))
    assert main(["bench", "digits_cnn", "--repeat", "2"]) == 0
    title = capsys.readouterr().out.splitlines()[0]
    assert title.startswith("**digits_cnn**"), title  # not its class, Sequential

    mod = tmp_path / "mynet2.py"
    mod.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(6, 3))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        assert main(["bench", "mynet2:build", "--input", "4x6", "--repeat", "2"]) == 0
    finally:
        sys.path.remove(str(tmp_path))
    assert capsys.readouterr().out.splitlines()[0].startswith("**Sequential**")  # MODULE:FACTORY: class name


def test_bench_forwards_passes_options_tune_and_tolerance(monkeypatch, capsys):
    import fxpress.bench as bench

    seen = {}
    real = bench.bench_model

    def fake(model, example, **kw):
        seen.update(kw)
        return real(model, example, **{**kw, "targets": (), "peers": ("eager",)})

    monkeypatch.setattr(bench, "bench_model", fake)
    assert main(["bench", "digits_cnn", "--repeat", "2", "--passes", "fuse,low_rank", "--tune", "3",
                 "--tolerance", "0.05", "--options", '{"low_rank": {"energy": 0.9}}']) == 0
    assert seen["passes"] == ["fuse", "low_rank"] and seen["tune"] == 3 and seen["tolerance"] == 0.05
    assert seen["options"] == {"low_rank": {"energy": 0.9}}
