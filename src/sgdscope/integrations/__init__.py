"""Adapters that drive a :class:`sgdscope.Scope` from other training frameworks.

Each lives in its own module and imports its framework only there, so ``import sgdscope`` never needs
one: ``sgdscope.integrations.lightning`` needs the ``[lightning]`` extra.
"""
