"""The HTML report: self-contained, has the per-stage table, FX diffs, graph pictures and Relax IR,
and renders in headless Chromium (screenshot is not blank)."""
import os
import re
import subprocess

import pytest
import torch

import fxpress
from fxpress import models
from fxpress.cli import main
from fxpress.graph_svg import changed_nodes, graph_to_svg, have_dot
from fxpress.html_report import write_html_report
from fxpress.passes.base import FunctionPass, PassResult
from fxpress.passes.graph import finalize

CHROMIUM = "/usr/bin/chromium"


def _relu_to_function(gm, ctx):
    """A small lossless pass for the test: nn.ReLU modules → torch.relu calls (changes the code)."""
    res = PassResult()
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.ReLU):
            with gm.graph.inserting_after(n):
                new = gm.graph.call_function(torch.relu, n.args)
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
            res.rewrite("relu_to_function", [n.name], [new.name])
    return finalize(gm), res


@pytest.fixture(scope="module")
def compiled():
    spec = models.get("digits_cnn")
    return fxpress.compile(spec.build(), spec.example_inputs(),
                           passes=[FunctionPass("relu_fn", _relu_to_function)], target="llvm")


@pytest.fixture(scope="module")
def page(compiled, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("report") / "digits.html")
    assert compiled.html_report(path) == path
    with open(path, encoding="utf-8") as f:
        return path, f.read()


def test_report_has_every_section(page, compiled):
    path, text = page
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # per-stage table with every stage
    table = re.search(r'<table class="stages">.*?</table>', text, re.S)
    assert table, "per-stage table missing"
    for stage in ("trace", "relu_fn", "lower:llvm"):
        assert f">{stage}<" in table.group(0)
    assert "applied" in table.group(0)
    # unified diff of the FX code between trace and the pass
    assert "--- trace" in text and "+++ relu_fn" in text
    assert re.search(r'<span class="add">\+ +relu = torch\.relu', text)
    assert re.search(r'<span class="del">- +_2 = ', text)
    # Relax IR of the final module
    assert "Relax IR of the final module (lower:llvm)" in text
    assert "@I.ir_module" in text and "R.nn.conv2d" in text
    # plots and graph pictures embedded; graph SVGs also written beside the page and linked
    assert "data:image/png;base64," in text
    assert text.count("data:image/svg+xml;base64,") == 2  # trace, relu_fn
    side = os.path.splitext(path)[0] + ".graphs"
    assert sorted(os.listdir(side)) == ["relu_fn.svg", "trace.svg"]
    assert 'href="digits.graphs/relu_fn.svg"' in text
    assert "3 new/changed in orange" in text
    # self-contained: nothing is fetched from elsewhere
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<script" not in text


def test_report_from_saved_report(compiled, tmp_path):
    """`fxpress inspect ARTIFACT --html` has only the records: the page still renders its tables."""
    path = write_html_report(compiled.report, str(tmp_path / "r.html"), title="saved")
    text = open(path, encoding="utf-8").read()
    assert '<table class="stages">' in text and "--- trace" in text and "@I.ir_module" in text
    assert "graph pictures need the CompiledModel" in text


def test_cli_inspect_writes_html(tmp_path, capsys):
    out = str(tmp_path / "cli.html")
    assert main(["inspect", "digits_cnn", "--passes", "none", "--target", "torch", "--html", out]) == 0
    assert "HTML report: " in capsys.readouterr().out
    text = open(out, encoding="utf-8").read()
    assert '<table class="stages">' in text and "lower:torch" in text
    # target torch: the page generates the Relax IR fxpress would build from the final graph
    assert "@I.ir_module" in text


@pytest.mark.parametrize("engine", ["matplotlib", "dot"])
def test_graph_svg(engine, compiled, tmp_path):
    if engine == "dot" and not have_dot():
        pytest.skip("Graphviz dot is not installed (the matplotlib layout is the fallback)")
    before, after = compiled.graph("trace"), compiled.graph("relu_fn")
    new = changed_nodes(before, after)
    assert new == {"relu", "relu_1", "relu_2"}
    svg = graph_to_svg(after, str(tmp_path / "g.svg"), title="after relu_fn", highlight=new, engine=engine)
    assert "<svg" in svg and svg.rstrip().endswith("</svg>")
    assert os.path.getsize(tmp_path / "g.svg") == len(svg.encode())
    for name in ("input_1", "relu_1", "output", "Conv2d"):
        assert name in svg or name.replace("_", "") in svg  # text may be split into glyph runs


def _png_pixels(path):
    from matplotlib import image

    return image.imread(path)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} missing: install it with `apt-get install -y chromium` (scripts/ci-system-deps.sh)")
def test_renders_in_headless_chromium(page, tmp_path):
    path, _ = page
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
           "--hide-scrollbars", f"file://{path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), f"chromium wrote no screenshot (exit {r.returncode}): {r.stderr[-1500:]}"
    px = _png_pixels(str(shot))
    assert px.shape[0] == 900 and px.shape[1] == 1200
    gray = px[..., :3].mean(axis=2)
    assert gray.std() > 0.05, "screenshot is blank"
    dark = (gray < 0.5).mean()  # text, table borders, plot bars
    assert 0.005 < dark < 0.6, f"screenshot looks empty or broken ({dark:.3%} dark pixels)"
