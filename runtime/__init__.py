"""Torch-free runtime (fxpress.runtime): load an exported artifact and run it on numpy arrays.

Needs only numpy plus the backend's package (tvm for the TVM library, onnxruntime for ONNX).
"""
from fxpress.errors import ArtifactError, InputError, TargetUnavailableError

from .backends import ORTExecutor, TVMExecutor
from .loader import Runtime, check_inputs, load
from .manifest import FORMAT_VERSION, read_manifest, write_manifest

__all__ = ["ArtifactError", "FORMAT_VERSION", "InputError", "ORTExecutor", "Runtime", "TVMExecutor",
           "TargetUnavailableError", "check_inputs", "load", "read_manifest", "write_manifest"]
