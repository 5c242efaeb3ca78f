"""The family table (fxpress/families.py) is the one list the pass, lowering and kernel registries read."""
import os
import subprocess
import sys

import pytest

from fxpress import families
from fxpress.passes import available_passes, get_pass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_pass_registry_name_is_a_family_in_canonical_order():
    assert available_passes() == families.CANONICAL_ORDER
    for fam in families.FAMILIES:
        assert get_pass(fam.name).name == fam.name


def test_table_lists_every_family_module_on_disk():
    """A new passes/<family>/, lowering/<family>_lowering.py or codegen/<family>_kernels.py must get a row."""
    on_disk = {
        "lowering": {f[:-3] for f in os.listdir(os.path.join(ROOT, "lowering")) if f.endswith("_lowering.py")},
        "kernels": {f[:-3] for f in os.listdir(os.path.join(ROOT, "codegen")) if f.endswith("_kernels.py")},
    }
    for layer, names in on_disk.items():
        assert {n.rsplit(".", 1)[1] for n in families.module_names(layer)} == names, layer
    packages = {d for d in os.listdir(os.path.join(ROOT, "passes"))
                if os.path.isfile(os.path.join(ROOT, "passes", d, "__init__.py"))}
    assert packages <= {f.passes for f in families.FAMILIES}


def test_lowering_registers_every_op_of_every_family():
    import torch

    from fxpress.lowering import onnx_translations, relax_converters

    relax, onnx = relax_converters(), onnx_translations()
    ops = [getattr(torch.ops.fxpress, name).default for name in
           ("lowrank_linear", "lowrank_conv2d", "shift_linear", "shift_conv2d", "binary_attention",
            "quantize", "dequantize", "qlinear", "qconv2d", "qmatmul", "qlinear_dynamic", "wlinear", "wconv2d")]
    for op in ops:
        assert op.__name__ in relax and op in onnx, op


def test_kernel_modules_have_default_schedules():
    for mod in families.import_modules("kernels"):
        assert callable(mod.apply_default_schedules), mod.__name__


def test_unknown_layer_is_an_error():
    with pytest.raises(ValueError, match="unknown layer"):
        families.module_names("codegen")


def test_codegen_imports_nothing_of_passes():
    """codegen reads the family table and the shift/add code format from torch-free leaf modules."""
    code = ("import sys, fxpress.codegen\n"
            "from fxpress import families\n"
            "families.import_modules('kernels')\n"
            "import fxpress.codegen.build\n"
            "bad = [m for m in sys.modules if m.startswith('fxpress.passes')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_leaf_modules_import_nothing_heavy():
    code = ("import sys\n"
            "import fxpress.families, fxpress.shift_codes\n"
            "bad = [m for m in ('torch', 'tvm', 'numpy') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
