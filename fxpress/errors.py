"""Error types shared by every layer of fxpress.

This module imports nothing, so passes/, lowering/, codegen/ and the torch-free runtime/ can all
raise these without pulling in the rest of the package. Every message names the thing at fault
(node, op, file, input) and says what to do.
"""


class FxpressError(Exception):
    """Base class: catch this to catch any error fxpress raises on purpose."""


class TraceError(FxpressError):
    """The model could not be captured as a graph (names the Python line)."""


class UnknownPassError(FxpressError, ValueError):
    """A ``passes=`` entry names no registered pass."""


class PassError(FxpressError):
    """A pass failed on a graph (names the pass and, where known, the node)."""


class LoweringError(FxpressError):
    """An op cannot be lowered to the chosen backend (names node, op and source line)."""


class BuildError(FxpressError):
    """TVM could not build the lowered module for the target."""


class InputError(FxpressError, ValueError):
    """Inputs given at call time (or at compile time) do not match what the model expects."""


class ArtifactError(FxpressError):
    """An exported artifact directory is missing a file, was altered, or is from a newer fxpress."""


class TargetUnavailableError(FxpressError):
    """The model was compiled for a device this machine does not have."""
