"""Codegen: Relax IRModule → built library for llvm (this CPU) or cuda. Does not import torch.

TVM sizes its CPU thread pool from TVM_NUM_THREADS and otherwise uses half the logical cores
(it assumes x86 hyper-threading), i.e. one thread on a 2-vCPU CI machine. Setting it before
TVM's thread pool first starts makes parallel kernels use every core; set it yourself to
override.
"""
import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

from .build import BuiltModule, build  # noqa: E402 - after TVM_NUM_THREADS
from .targets import device_for, gpu_available, resolve_target, target_kind  # noqa: E402
from .tune import tune  # noqa: E402

__all__ = ["BuiltModule", "build", "device_for", "gpu_available", "resolve_target", "target_kind", "tune"]
