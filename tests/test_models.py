import pytest
import torch
import torch.fx

from fxpress.models import (
    ModelSpec,
    accuracy,
    digits_data,
    get,
    names,
    resnet18,
    trained_digits_cnn,
)
from fxpress.models import digits as digits_module

OUT_SHAPES = {
    ("resnet18", "small"): (2, 10),
    ("resnet18", "full"): (1, 1000),
    ("mobilenet_v2", "small"): (2, 10),
    ("mobilenet_v2", "full"): (1, 1000),
    ("vit_tiny", "small"): (2, 10),
    ("vit_tiny", "full"): (1, 1000),
    ("bert_small", "small"): (2, 2),
    ("bert_small", "full"): (1, 2),
    ("digits_cnn", "small"): (8, 10),
    ("digits_cnn", "full"): (64, 10),
}


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    # Keep the trained digits weights out of the real ~/.cache during tests.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXPRESS_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        trained_digits_cnn.cache_clear()
        yield
    trained_digits_cnn.cache_clear()


def test_names():
    assert names() == ["resnet18", "mobilenet_v2", "vit_tiny", "bert_small", "digits_cnn"]
    for name in names():
        for size in ("small", "full"):
            spec = get(name, size)
            assert isinstance(spec, ModelSpec) and spec.name == name
    with pytest.raises(KeyError):
        get("nope")
    with pytest.raises(ValueError):
        get("resnet18", "huge")


def test_seed_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    resnet18(width=8, num_classes=10, seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", names())
def test_full_output_shape(name):
    spec = get(name, "full")
    with torch.no_grad():
        out = spec.build()(*spec.example_inputs())
    assert out.shape == OUT_SHAPES[name, "full"]


@pytest.mark.parametrize("name", names())
def test_small_deterministic_and_traceable(name):
    spec = get(name, "small")
    model = spec.build()
    inputs = spec.example_inputs()
    assert all(torch.equal(a, b) for a, b in zip(inputs, spec.example_inputs()))
    with torch.no_grad():
        eager = model(*inputs)
        assert eager.shape == OUT_SHAPES[name, "small"]
        assert torch.isfinite(eager).all()
        assert torch.equal(spec.build()(*inputs), eager), "same seed must give identical outputs"

        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(*inputs), eager, rtol=0, atol=0)

        exported = torch.export.export(model, inputs)
        torch.testing.assert_close(exported.module()(*inputs), eager)


def test_attention_is_explicit():
    # Compiler passes rely on seeing matmul/softmax, not a fused SDPA kernel.
    for name in ("vit_tiny", "bert_small"):
        graph = torch.fx.symbolic_trace(get(name).build()).graph
        targets = {n.target for n in graph.nodes if n.op == "call_function"}
        assert torch.matmul in targets and torch.softmax in targets
        assert torch.nn.functional.scaled_dot_product_attention not in targets


def test_digits_accuracy():
    spec = get("digits_cnn")
    assert spec.has_labels
    _, _, x_test, y_test = digits_data()
    assert x_test.shape[1:] == (1, 8, 8) and y_test.dtype == torch.int64
    assert 0.0 <= x_test.min() and x_test.max() <= 1.0
    assert accuracy(spec.build(), x_test, y_test) >= 0.95


def test_digits_data_split_is_fixed():
    a, b = digits_data(0), digits_data(0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert len(a[0]) + len(a[2]) == 1797


def test_digits_disk_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_CACHE_DIR", str(tmp_path))
    trained_digits_cnn.cache_clear()
    first = trained_digits_cnn(epochs=1)
    assert trained_digits_cnn(epochs=1) is first  # in-process cache
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temp file left behind

    trained_digits_cnn.cache_clear()

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded from the disk cache")

    monkeypatch.setattr(digits_module, "_train", no_training)
    second = trained_digits_cnn(epochs=1)
    assert second is not first and not second.training
    for (k1, v1), (k2, v2) in zip(first.state_dict().items(), second.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    trained_digits_cnn.cache_clear()
