"""split_branches on the DyCL families added for issue #15, written without annotations:
lists grown across a loop that breaks, Python int counters whose bound is in the loop condition,
static loops over the batch (`range(x.shape[0])`), and the default passes finding them by themselves.

Models: fxpress.models.dynamic_families (seeded random weights, thresholds calibrated at build time).
The 100-input llvm/onnx acceptance bar for these models is in test_split_branches_e2e.py.
"""
import ast

import pytest
import torch
from torch import nn

import fxpress
from fxpress.dynamic_model import DynamicCompiledModel
from fxpress.errors import TraceError
from fxpress.models.registry import get_dynamic
from fxpress.frontends.split_branches.counter_bound import counter_bound
from fxpress.frontends.split_branches.names import mutated_names

NEW_FAMILIES = ["greedy_decoder", "counter_loop", "ranet", "sample_gate", "attn_decoder"]


def _bound_of(src: str, start_stmt: str = "i = 0"):
    fdef = ast.parse(src).body[0]
    loop = next(s for s in fdef.body if isinstance(s, ast.While))
    preceding = fdef.body[:fdef.body.index(loop)]

    def static_eval(e):
        try:
            return True, eval(compile(ast.Expression(e), "<t>", "eval"), {"N": 10})  # noqa: S307
        except Exception:  # noqa: BLE001
            return False, None

    return counter_bound(loop, preceding, static_eval)


@pytest.mark.parametrize("src, expected", [
    ("def f(y):\n i = 0\n while y.norm() > 1 and i < 10:\n  y = y / 2\n  i += 1\n", 10),
    ("def f(y):\n i = 0\n while y.norm() > 1 and i <= 10:\n  y = y / 2\n  i += 1\n", 11),
    ("def f(y):\n i = 2\n while i < N and y.sum() > 0:\n  y = y - 1\n  i += 3\n", 3),   # 2, 5, 8
    ("def f(y):\n i = 0\n while N > i and y.sum() > 0:\n  i += 1\n", 10),
    ("def f(y):\n i = 12\n while y.sum() > 0 and i < 10:\n  i += 1\n", 0),
])
def test_counter_bound_is_read_from_the_condition(src, expected):
    assert _bound_of(src) == expected


@pytest.mark.parametrize("src", [
    # the counter may not advance: in a branch, skipped by continue, decremented, two writers, unknown start
    "def f(y):\n i = 0\n while y.sum() > 0 and i < 10:\n  if y.mean() > 0:\n   i += 1\n",
    "def f(y):\n i = 0\n while y.sum() > 0 and i < 10:\n  if y.mean() > 0:\n   continue\n  i += 1\n",
    "def f(y):\n i = 0\n while y.sum() > 0 and i < 10:\n  i -= 1\n",
    "def f(y):\n i = 0\n while y.sum() > 0 and i < 10:\n  i += 1\n  i = i * 2\n",
    "def f(y, i):\n while y.sum() > 0 and i < 10:\n  i += 1\n",
    "def f(y):\n i = 0\n while y.sum() > 0 or i < 10:\n  i += 1\n",          # `or`: no bound
])
def test_counter_bound_refuses_what_it_cannot_prove(src):
    assert _bound_of(src) is None


def test_mutated_names_sees_in_place_changes():
    tree = ast.parse("outs.append(y)\nd[k] = v\nh.add_(1)\nz = w.sum()\nobj.attr = 3\n")
    assert [mutated_names(s) for s in tree.body] == [["outs"], ["d"], ["h"], [], ["obj"]]


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_family_compiles_without_annotations_and_matches_eager(name):
    spec = get_dynamic(name)
    model = spec.build()
    cm = fxpress.compile(model, spec.example_inputs(), passes=["split_branches"], target="torch")
    paths = set()
    for seed in range(30):
        x = spec.sample(seed)
        y, trace = cm.run_with_trace(*x)
        y_ref, markers = cm.eager_trace(model, *x)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        assert trace.markers == markers
        paths.add(trace.key())
    assert len(paths) >= 2


@pytest.mark.parametrize("name", ["greedy_decoder", "counter_loop", "sample_gate"])
def test_default_passes_detect_the_control_flow(name):
    spec = get_dynamic(name)
    cm = fxpress.compile(spec.build(), spec.example_inputs(), target="torch")  # passes="default"
    assert isinstance(cm, DynamicCompiledModel) and "fuse" in cm.passes


def test_greedy_decoder_output_length_follows_the_break():
    spec = get_dynamic("greedy_decoder")
    model = spec.build()
    cm = fxpress.compile(model, spec.example_inputs(), passes=["split_branches"], target="torch")
    lengths = {cm(*spec.sample(seed)).shape[1] for seed in range(40)}
    assert lengths == {1, 2, 3, 4}  # one list length per way out of the loop
    assert any("each break runs its own copy" in n for n in cm.split.notes)


def test_counter_loop_bound_comes_from_the_condition():
    spec = get_dynamic("counter_loop")
    cm = fxpress.compile(spec.build(), spec.example_inputs(), passes=["split_branches"], target="torch")
    loop = next(n for n in cm.split.host.body if getattr(n, "op", "") == "while")
    assert loop.max_iter == 4


class _NestedGrowingList(nn.Module):
    """A list grown up to a break inside a loop that is itself inside a branch: not specialisable."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        outs = []
        if x.sum() > 0:
            for _ in range(3):
                x = self.lin(x)
                outs.append(x)
                if x.mean() > 0:
                    break
        else:
            outs.append(x)
        return torch.stack(outs, 1)


def test_growing_list_in_nested_loop_is_a_clear_error():
    with pytest.raises(TraceError, match="different shape or length depending on the iteration"):
        fxpress.compile(_NestedGrowingList(), (torch.randn(1, 4),), passes=["split_branches"], target="torch")
