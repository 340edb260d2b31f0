"""The measurement layer: :class:`Scope` drives probes along any trajectory and sends their rows to sinks.

It knows nothing of run configs, run directories or the trainer: it imports the kernels
(:mod:`sgdscope.curvature`, :mod:`sgdscope.landscape`) only. ``sgdscope.Scope`` adds run directories on
top; the built-in trainer is one client, a researcher's own loop another.
"""
