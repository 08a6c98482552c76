"""Forseti: a Triton-compatible inference and policy server with a training sidecar."""

__version__ = "0.1.0"
