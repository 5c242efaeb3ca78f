"""The split_branches front end's place in the layers (issue #19): its own package ahead of the passes,
imports that point one way, and one compile path shared with the static front end. Reads source only."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_END = ROOT / "frontends"


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports, function-level imports included (relative ones resolved
    within the fxpress package layout: frontends/ is fxpress.frontends, passes/ is fxpress.passes ...)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = ["fxpress"] + list(rel.parts[:-1]) if rel.parts[0] != "fxpress" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def _py_files(*folders: str):
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


@pytest.mark.parametrize("path", _py_files("passes", "lowering", "codegen", "runtime"), ids=lambda p: p.name)
def test_lower_layers_never_import_the_front_end(path):
    assert not {m for m in _imports(path) if m.startswith("fxpress.frontends")}


@pytest.mark.parametrize("path", _py_files("frontends"), ids=lambda p: p.name)
def test_front_end_imports_only_passes_and_leaf_modules(path):
    """The front end may use the passes (and the dependency-free fxpress.errors / fxpress.control), never
    the compile driver, the lowering or the runtime above or beside it."""
    allowed = ("fxpress.errors", "fxpress.control", "fxpress.passes", "fxpress.frontends")
    bad = {m for m in _imports(path) if m.startswith("fxpress") and not m.startswith(allowed)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", _py_files("frontends"), ids=lambda p: p.name)
def test_front_end_files_are_small(path):
    assert len(path.read_text().splitlines()) <= 600


@pytest.mark.parametrize("name", ["api.py", "dynamic.py"])
def test_one_compile_path(name):
    """compile() and the split_branches driver reach the passes and the lowering only through
    fxpress/pipeline.py, so the trace → passes → lower → CompiledModel sequence is written once."""
    tree = ast.parse((ROOT / "fxpress" / name).read_text())
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not used & {"PassManager", "PassContext", "lower"}
    assert "fxpress.pipeline" in _imports(ROOT / "fxpress" / name)
