"""Executors for an exported graph: the TVM Relax VM and ONNX Runtime. Torch-free.

Each takes numpy arrays in the manifest's input order and returns a list of numpy arrays.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from fxpress.errors import ArtifactError, TargetUnavailableError


class TVMExecutor:
    """Runs a Relax VM library exported by fxpress; parameters come from an .npz beside it."""

    def __init__(self, library: str, params: str | None, device: str = "cpu"):
        import tvm
        from tvm import relax

        self._tvm = tvm
        self.device = _tvm_device(tvm, device)
        lib = tvm.runtime.load_module(library)
        self.vm = relax.VirtualMachine(lib, self.device)
        self.params = []
        if params:
            with np.load(params, allow_pickle=False) as data:
                # Keys are p0, p1, ... in the function's parameter order.
                self.params = [tvm.runtime.tensor(data[f"p{i}"], self.device) for i in range(len(data.files))]
        self._main = self.vm["main"]

    @classmethod
    def from_built(cls, executable, params: list[np.ndarray], device: str = "cpu") -> "TVMExecutor":
        """Wrap a freshly built executable (in-process, before export)."""
        import tvm
        from tvm import relax

        self = cls.__new__(cls)
        self._tvm = tvm
        self.device = _tvm_device(tvm, device)
        self.vm = relax.VirtualMachine(executable, self.device)
        self.params = [tvm.runtime.tensor(np.asarray(p, order="C"), self.device) for p in params]
        self._main = self.vm["main"]
        return self

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        args = [tvm.runtime.tensor(np.asarray(x, order="C"), self.device) for x in inputs]  # keeps 0-d arrays 0-d
        out = self._main(*args, *self.params)
        return _flatten_tvm(out)


def _tvm_device(tvm, device: str):
    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
    if device == "cuda" and not dev.exist:
        raise TargetUnavailableError(
            "this artifact was compiled for CUDA but this machine has no CUDA GPU; run it on a GPU machine, "
            "load it with backend='onnx', or recompile with target='llvm'")
    return dev


def _flatten_tvm(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    flat: list[np.ndarray] = []
    for item in out:
        flat.extend(_flatten_tvm(item))
    return flat


class ORTExecutor:
    """Runs an ONNX model with ONNX Runtime (CUDA provider when asked and present, else CPU)."""

    def __init__(self, model: str | bytes, device: str = "cpu", threads: int | None = None):
        """``model`` is a file path or the serialized model bytes."""
        import onnxruntime as ort

        if isinstance(model, str) and not os.path.isfile(model):
            raise ArtifactError(f"ONNX model {model} is missing")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise TargetUnavailableError("ONNX Runtime has no CUDA provider on this machine; use device='cpu'")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(model, sess_options=opts, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed: dict[str, Any] = {n: np.asarray(x, order="C") for n, x in zip(self.input_names, inputs)}
        return list(self.session.run(None, feed))
