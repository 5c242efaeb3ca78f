import os

import pytest

# Keep trained-model caches inside the test session, never in the user's home.
os.environ.setdefault("FXPRESS_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "fxpress"))


def pytest_collection_modifyitems(config, items):
    try:
        import tvm

        has_gpu = tvm.cuda(0).exist
    except Exception:  # noqa: BLE001 - no TVM CUDA runtime means no GPU for us
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
