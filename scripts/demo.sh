#!/usr/bin/env bash
# The main job: install, compile a bundled model with the default passes, print the per-pass
# report, export the artifacts, and run the export in the torch-free runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${1:-resnet18}
OUT=${OUT:-out/$MODEL}
.venv/bin/fxpress compile "$MODEL" --passes default --target llvm --out "$OUT" --details
.venv/bin/python - "$OUT" <<'PY'
import sys
import numpy as np
import fxpress.runtime

rt = fxpress.runtime.load(sys.argv[1])
x = [np.random.default_rng(0).standard_normal(s["shape"]).astype(s["dtype"]) if s["dtype"].startswith("float")
     else np.zeros(s["shape"], s["dtype"]) for s in rt.inputs]
y = rt(*x)
print(f"\ntorch-free runtime ({rt.backend}): output shape {getattr(y, 'shape', None)}; torch imported: {'torch' in sys.modules}")
PY
