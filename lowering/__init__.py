"""FX → TVM Relax IRModule and FX → ONNX (fxpress.lowering)."""
from .registry import onnx_translations, register_onnx_translation, register_relax_converter, relax_converters
from .to_onnx import OnnxModel, to_onnx
from .to_relax import RelaxModule, export_program, to_relax

__all__ = ["OnnxModel", "RelaxModule", "export_program", "onnx_translations", "register_onnx_translation",
           "register_relax_converter", "relax_converters", "to_onnx", "to_relax"]
