"""The CLI as a new user meets it (issues #16 and #17 item 10): one-line errors with exit status 2,
--version, `models`, --help with defaults and pass names, progress lines, hidden machinery noise,
calibration from a file, cwd on the import path, --html without matplotlib."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fxpress
from fxpress.cli import build_parser, main

EXE = os.path.join(os.path.dirname(sys.executable), "fxpress")

NET = """
import warnings
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 6)
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, ids):
        warnings.warn("Net: the user's own warning")
        return self.fc(self.emb(ids)).relu()

def build():
    return Net(), (torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0)),)
"""


@pytest.fixture
def netdir(tmp_path, monkeypatch):
    (tmp_path / "usernet.py").write_text(NET)
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "thesis.txt").write_text("mine")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_line_error(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fxpress") and "error:" in err, err
    import re
    assert re.search(pattern, err), err
    return err


@pytest.mark.parametrize("argv, pattern", [
    (["compile", "digits_cnn", "--target", "torch", "--options", "{bad"],
     r"--options is not valid JSON .*write it like"),
    (["compile", "digits_cnn", "--target", "torch", "--options", "[1]"], r"--options must be a JSON object"),
    (["compile", "digits_cnn", "--target", "torch", "--out", "/proc/x"], r"cannot create a directory in /proc"),
    (["compile", "digits_cnn", "--target", "torch", "--out", "/dev/null/x"], r"/dev/null is not a directory"),
    (["compile", "digits_cnn", "--target", "torch", "--out", "."], r"refusing to export to .*current directory"),
    (["export", "digits_cnn", "--target", "torch", "--out", "proj"], r"proj: it is a directory that is not an fxpress artifact"),
    (["bench", "digits_cnn", "--repeat", "-5"], r"--repeat -5: the number of timed runs must be at least 1"),
    (["bench", "digits_cnn", "--targets", "bogus"], r"--targets 'bogus': unknown target\(s\) \['bogus'\]"),
    (["compile", "usernet:build", "--input", "0x5:int64", "--target", "llvm"],
     r"dimensions must be positive integers \(a batch of 0 samples cannot be compiled\)"),
    (["compile", "digits_cnn", "--calibration", "nope.npz", "--target", "torch"], r"--calibration nope.npz: no such file"),
])
def test_bad_arguments_are_one_line_with_status_2(netdir, capsys, argv, pattern):
    assert main(argv) == 2
    _one_line_error(capsys, pattern)
    assert (netdir / "proj" / "thesis.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, pattern", [
    (["compile", "digits_cnn", "--tune", "many"], r"argument --tune: invalid int value: 'many' \(see fxpress compile --help\)"),
    (["bench", "digits_cnn", "--target", "llvm"], r"unrecognized arguments: --target"),  # removed: it did nothing
    (["compile", "digits_cnn", "--target", "tpu"], r"argument --target: invalid choice: 'tpu'"),
])
def test_argparse_errors_are_one_line_with_status_2(capsys, argv, pattern):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_line_error(capsys, pattern)


def test_inspect_unknown_stage(tmp_path, capsys):
    out = str(tmp_path / "art")
    assert main(["compile", "digits_cnn", "--passes", "none", "--target", "onnx", "--out", out, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", out, "--stage", "bogus"]) == 2
    _one_line_error(capsys, r"--stage 'bogus': no such stage; choose one of trace, lower:onnx")


def test_bench_with_no_successful_row_exits_nonzero(monkeypatch, capsys):
    import fxpress.bench as bench

    def all_failed(model, example, targets, **kw):
        return bench.BenchResult(model="m", passes="none", inputs=[{"shape": [1], "dtype": "float32"}], repeat=1,
                                 warmup=0, peers=[bench.PeerResult(peer=f"fxpress:{t}", error="boom") for t in targets],
                                 memory_method="-", threads={})

    monkeypatch.setattr(bench, "bench_model", all_failed)
    assert main(["bench", "digits_cnn", "--targets", "llvm,onnx", "--quiet"]) == 1
    assert "no fxpress target ran successfully" in capsys.readouterr().err


def test_version_and_models(capsys):
    r = subprocess.run([EXE, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"fxpress {fxpress.__version__}"
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in fxpress.models.names():
        assert name in out
    assert "bert_small     --size small  inputs 2x16:int64" in out
    assert "resnet18       --size full   inputs 1x3x224x224" in out


def test_help_shows_defaults_and_pass_names():
    sub = build_parser()._subparsers._group_actions[0].choices
    text = " ".join(sub["compile"].format_help().split())
    for name in fxpress.available_passes():
        assert name in text
    assert "(default: llvm)" in text and "(default: default)" in text and "(default: 0)" in text
    bench_help = " ".join(sub["bench"].format_help().split())
    assert "--target " not in bench_help and "(default: 20)" in bench_help and "(default: llvm,onnx)" in bench_help


def test_factory_module_in_the_current_directory(tmp_path):
    (tmp_path / "cwdnet.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(6, 3)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([EXE, "compile", "cwdnet:build", "--input", "4x6", "--passes", "none", "--target", "torch"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "lower:torch" in r.stdout
    r = subprocess.run([EXE, "compile", "nonet:build", "--input", "4x6"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 2
    assert f"no module 'nonet' in the current directory ({tmp_path})" in r.stderr


def test_progress_lines_and_quiet(netdir, capsys):
    assert main(["compile", "usernet:build", "--passes", "none", "--target", "torch"]) == 0
    err = capsys.readouterr().err
    import re
    lines = re.findall(r"^  (\S+) +(\d+\.\d\d) s  \(ok\)$", err, re.M)
    assert [name for name, _ in lines] == ["trace", "lower:torch"], err
    assert main(["compile", "usernet:build", "--passes", "none", "--target", "torch", "--quiet"]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("  trace")]


def test_machinery_noise_hidden_user_warnings_kept(netdir, capfd, monkeypatch):
    monkeypatch.delenv("FXPRESS_VERBOSE", raising=False)
    argv = ["compile", "usernet:build", "--passes", "none", "--target", "llvm", "--quiet"]
    assert main(argv + ["--verbose"]) == 0
    noisy = capfd.readouterr().err
    assert "Fast mode segfaults" in noisy  # TVM's C++ warning for an embedding gather: the noise under test
    assert main(argv) == 0
    quiet = capfd.readouterr()
    assert "Fast mode segfaults" not in quiet.err + quiet.out
    assert "UserWarning: Net: the user's own warning" in quiet.err  # never hidden...
    assert quiet.err.count("the user's own warning") == 2  # ...and shown once (message + source line)
    monkeypatch.setenv("FXPRESS_VERBOSE", "1")
    assert main(argv) == 0
    assert "Fast mode segfaults" in capfd.readouterr().err


def test_calibration_file_and_the_note_without_one(tmp_path, capsys):
    base = ["compile", "digits_cnn", "--passes", "quantize", "--target", "torch", "--quiet"]
    assert main(base) == 0
    assert "quantize used the single example input as calibration data; pass --calibration FILE" in capsys.readouterr().out
    x = fxpress.models.digits_data()[2][:24].numpy()
    np.savez(tmp_path / "calib.npz", input_0=x)
    assert main(base + ["--calibration", str(tmp_path / "calib.npz")]) == 0
    assert f"quantize used 3 batch(es) from {tmp_path / 'calib.npz'}" in capsys.readouterr().out
    torch.save([(torch.from_numpy(x[:8]),), (torch.from_numpy(x[8:16]),)], tmp_path / "calib.pt")
    assert main(base + ["--calibration", str(tmp_path / "calib.pt")]) == 0
    assert "quantize used 2 batch(es)" in capsys.readouterr().out
    np.savez(tmp_path / "two.npz", a=x, b=x)
    assert main(base + ["--calibration", str(tmp_path / "two.npz")]) == 2
    _one_line_error(capsys, r"holds 2 array\(s\); the model takes 1 input\(s\)")


def test_html_without_matplotlib(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    html = tmp_path / "r.html"
    assert main(["compile", "digits_cnn", "--passes", "none", "--target", "torch", "--quiet", "--html", str(html)]) == 0
    assert html.read_text().count("<html") == 1
    assert "written without plots: matplotlib is not installed" in capsys.readouterr().out


def test_portable_export(netdir, monkeypatch, capsys):
    from fxpress.runtime.manifest import read_manifest

    monkeypatch.delenv("FXPRESS_PORTABLE", raising=False)
    argv = ["export", "usernet:build", "--passes", "none", "--target", "llvm", "--quiet", "--out", "art"]
    assert main(argv + ["--portable"]) == 0
    assert "FXPRESS_PORTABLE" not in os.environ  # the flag does not outlive the command
    tvm_entry = read_manifest("art")["backends"]["tvm"]
    assert tvm_entry["portable"] is True and tvm_entry["isa"] == []
    assert main(argv) == 0
    assert read_manifest("art")["backends"]["tvm"]["portable"] is False


def test_empty_example_input_is_refused_before_tvm():
    from fxpress.errors import InputError

    with pytest.raises(InputError, match=r"example_inputs\[0\] has shape \(0, 4\), no elements; pass at least one sample"):
        fxpress.compile(torch.nn.Linear(4, 2), torch.randn(0, 4), passes="none", target="llvm")


def test_failed_compile_says_how_much_output_was_hidden(monkeypatch, capfd):
    from fxpress.errors import LoweringError

    def noisy_failure(*a, **k):
        os.write(2, b"[12:00:00] transform.h:1261: Warning: machinery noise\n")
        print("def forward(self, x): ...")
        raise LoweringError("op foo at model.py:3 has no TVM lowering; use target='onnx'")

    monkeypatch.setattr(fxpress, "compile", noisy_failure)
    monkeypatch.delenv("FXPRESS_VERBOSE", raising=False)
    assert main(["compile", "digits_cnn", "--passes", "none", "--quiet"]) == 2
    err = capfd.readouterr().err
    assert "machinery noise" not in err and "def forward" not in err
    assert err.strip().splitlines() == [
        "fxpress: error: op foo at model.py:3 has no TVM lowering; use target='onnx'",
        "fxpress: (2 lines of compiler output were hidden; --verbose shows them)"]
