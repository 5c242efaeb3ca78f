#!/usr/bin/env bash
# The main job: install, compile a bundled model with the default passes, print the per-pass
# report, export the artifacts, and run the export in the torch-free runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${1:-resnet18}
OUT=${OUT:-out/$MODEL}
.venv/bin/fxpress compile "$MODEL" --passes default --target llvm --out "$OUT"
.venv/bin/python - "$OUT" <<'PY'
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    """Prove the runtime needs no torch: any import of it fails in this process."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in the runtime demo")

sys.meta_path.insert(0, NoTorch())
import numpy as np
import fxpress.runtime

rt = fxpress.runtime.load(sys.argv[1])
x = [np.random.default_rng(0).standard_normal(s["shape"]).astype(s["dtype"]) if s["dtype"].startswith("float")
     else np.zeros(s["shape"], s["dtype"]) for s in rt.inputs]
y = rt(*x)
print(f"\nruntime with torch blocked ({rt.backend} backend): output shape {y.shape}, first row {np.round(y[0][:4], 4)}")
PY
