"""Front ends (fxpress.frontends): stages ahead of tracing and the FX passes that turn a model into
the graphs the passes see. A front end is selected by its name in ``compile(passes=[...])`` and reads
its own section of ``compile(options=...)``; it may import fxpress.passes, never the reverse.

- ``split_branches``: models with data-dependent Python control flow → branch-free regions + a host program.
"""

# Names in ``passes=`` that select a front end rather than an FX pass (fxpress/api.py picks them out).
FRONT_ENDS = ("split_branches",)
