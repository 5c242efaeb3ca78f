"""Measured per-layer latency of each candidate: the layer alone, compiled for the target, timed here.

Each (layer, candidate) is compiled as a one-layer model with the same pass the whole-model pipeline would
run on it, on the layer's real input shape and calibration inputs, and timed through the CompiledModel.
The call overhead is the same for every candidate of a layer, so it cancels in the gains the search uses.

Results are cached like tuning records (with the load average at measurement: an entry timed on a busy
machine is re-measured when the machine is quieter): a JSON file keyed by CPU (model name and the ISA flags that
change codegen), TVM version, a fingerprint of fxpress's own code generation (its lowering and codegen
sources: a new kernel invalidates the timings of the old one), target, the layer's module repr, input
shape and candidate, under ``$FXPRESS_CACHE_DIR`` or ``~/.cache/fxpress`` (``auto-latency.json``). They feed the search only; no test
verdict may depend on them.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from .candidates import Candidate, Layer, build_passes

_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "neon", "asimd")


def cpu_signature() -> str:
    model, flags = "unknown-cpu", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown-cpu":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        import tvm
        tvm_version = tvm.__version__
    except Exception:  # noqa: BLE001 - onnx / torch targets do not need TVM
        tvm_version = "no-tvm"
    return f"{model}|{'+'.join(f for f in _ISA_FLAGS if f in flags)}|tvm {tvm_version}|{os.cpu_count()} cpus"


@functools.lru_cache(maxsize=1)
def codegen_fingerprint() -> str:
    """A short hash of the sources that decide which kernels a layer compiles to (fxpress.lowering and
    fxpress.codegen): timings cached under an older code generation are not reused."""
    import importlib.util

    digest = hashlib.sha256()
    for package in ("fxpress.lowering", "fxpress.codegen"):  # located, not imported (no TVM import here)
        for folder in importlib.util.find_spec(package).submodule_search_locations:
            for path in sorted(Path(folder).glob("*.py")):
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def default_cache_path() -> Path:
    root = os.environ.get("FXPRESS_CACHE_DIR") or Path.home() / ".cache" / "fxpress"
    return Path(root) / "auto-latency.json"


class _OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def time_interleaved(fns: dict, x, min_round_s: float = 0.003, rounds: int = 15) -> dict[str, float]:
    """Fastest round's seconds per call of each callable; each round runs every callable in turn.

    The minimum, not the median: on a shared machine other processes only ever add time, and a single
    inflated entry would steer the search away from a good kernel for as long as it is cached."""
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn(x)
        t0 = time.perf_counter()
        fn(x)
        calls[name] = max(1, min(1000, int(min_round_s / max(time.perf_counter() - t0, 1e-7))))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn(x)
            best[name] = min(best[name], (time.perf_counter() - t0) / n)
    return best


class LatencyTable:
    """layer key -> candidate name -> seconds, measured on demand and cached on disk."""

    def __init__(self, target: str, cache_path: Path | None = None, progress=None):
        self.target = target
        self.cache_path = Path(cache_path) if cache_path else default_cache_path()
        self.signature = f"{cpu_signature()}|codegen {codegen_fingerprint()}"
        self.progress = progress
        self.measured = 0  # compiles done in this run (cache misses)
        self._cache: dict[str, list[float]] = {}  # key -> [seconds, load average when measured]
        self.load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if self.cache_path.exists():
            try:
                self._cache = json.loads(self.cache_path.read_text())
            except (OSError, ValueError):
                self._cache = {}  # a corrupt cache is re-measured, never trusted

    def _key(self, module: nn.Module, x: torch.Tensor, c: Candidate) -> str:
        return f"v2|{self.signature}|{self.target}|{module!r}|{tuple(x.shape)}|{c.name}"

    def measure(self, layer: Layer, module: nn.Module, x: torch.Tensor, calib: list[torch.Tensor]) -> dict[str, float]:
        """Seconds per call of each candidate of ``layer``: compiled first, then timed in interleaved rounds
        (every candidate once per round, the fastest round kept), so a burst of load elsewhere hits all alike."""
        from fxpress.api import compile as fx_compile

        row: dict[str, float] = {}
        compiled: dict[str, object] = {}
        for c in layer.candidates:
            key = self._key(module, x, c)
            if key in self._cache and not self._stale(self._cache[key]):
                row[c.name] = self._cache[key][0]
                continue
            one = Layer("layer", "layer", ["layer"], layer.kind, layer.out, layer.d, layer.weight_params, [c])
            try:
                compiled[c.name] = fx_compile(_OneLayer(module), (x,), passes=build_passes([one], {"layer": c})[1:],
                                              target=self.target, calibration=[(b,) for b in calib])
            except Exception as e:  # noqa: BLE001 - a candidate that does not compile is no candidate
                if self.progress:
                    self.progress(f"latency: {layer.label} {c.name}: not compiled ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:120] if str(e) else ''})")
                row[c.name] = float("inf")
        for name, seconds in time_interleaved(compiled, x).items():
            row[name] = seconds
            self.measured += 1
            self._cache[self._key(module, x, next(c for c in layer.candidates if c.name == name))] = \
                [seconds, round(self.load, 2)]
        self._save()
        return {c.name: row[c.name] for c in layer.candidates}

    def _stale(self, entry) -> bool:
        """An entry timed on a machine busier than it has cores is re-measured once this one is half as busy."""
        if not isinstance(entry, list) or len(entry) != 2:
            return True
        busy = entry[1] >= (os.cpu_count() or 1)
        return busy and self.load < entry[1] / 2

    def _save(self) -> None:
        finite = {k: v for k, v in self._cache.items() if v[0] != float("inf")}
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_path.parent, prefix=self.cache_path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(finite, f, indent=0, sort_keys=True)
            os.replace(tmp, self.cache_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def layer_inputs(fused, layers: list[Layer], batches: list[tuple]) -> dict[str, tuple[nn.Module, list[torch.Tensor]]]:
    """layer key -> (its module in the fused graph, its input on each batch), captured with forward pre-hooks."""
    found: dict[str, tuple[nn.Module, list[torch.Tensor]]] = {}
    handles = []
    for L in layers:
        node = next((n for n in fused.graph.nodes if n.name == L.names[0]), None)
        if node is None or node.op != "call_module":
            continue
        mod = fused.get_submodule(node.target)
        seen: list[torch.Tensor] = []
        found[L.key] = (mod, seen)

        def hook(_m, args, seen=seen):
            seen.append(args[0].detach().clone())

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for b in batches:
                fused(*b)
    finally:
        for h in handles:
            h.remove()
    return found
