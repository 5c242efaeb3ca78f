"""Outputs rebuilt in eager's structure (fxpress/outputs.py): transformers ModelOutput objects built
directly must be indistinguishable from the ones their constructor builds."""
import torch
import torch.utils._pytree as pytree
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput

from fxpress.outputs import output_builder


def _as_plain(o):
    return type(o), list(o.keys()), {k: id(v) for k, v in vars(o).items()}, [id(v) for v in o.to_tuple()]


def test_model_output_built_directly_equals_the_constructor():
    a, b = torch.randn(1, 4, 8), torch.randn(1, 8)
    for eager in (BaseModelOutputWithPooling(last_hidden_state=a, pooler_output=b),
                  BaseModelOutputWithPooling(last_hidden_state=a),  # None fields: not entries, still attributes
                  SequenceClassifierOutput(logits=b)):
        leaves, spec = pytree.tree_flatten(eager)
        build = output_builder(spec)
        first, second = build(leaves), build(leaves)  # the first is checked against tree_unflatten
        assert build.checked  # the second was built directly
        for got in (first, second):
            assert _as_plain(got) == _as_plain(eager)
            assert got[0] is leaves[0] and len(got) == len(eager)
            assert got.hidden_states is None and got.attentions is None


def test_other_structures_go_through_tree_unflatten():
    a, b = torch.randn(2), torch.randn(3)
    for eager in ((a, b), {"x": a, "y": [b]}, a):
        leaves, spec = pytree.tree_flatten(eager)
        assert str(output_builder(spec)(leaves)) == str(eager)


def test_a_mismatching_direct_build_falls_back(monkeypatch):
    """If the direct build ever differs from tree_unflatten (another transformers version), the
    builder returns tree_unflatten's result, now and on every later call."""
    from fxpress import outputs

    eager = BaseModelOutputWithPooling(last_hidden_state=torch.randn(1, 2), pooler_output=torch.randn(1, 2))
    leaves, spec = pytree.tree_flatten(eager)
    monkeypatch.setattr(outputs, "_same", lambda a, b: False)
    build = output_builder(spec)
    for _ in range(2):
        assert _as_plain(build(leaves)) == _as_plain(eager)
    assert build.direct is None
