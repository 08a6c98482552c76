"""Errors raised by the exporters."""

from __future__ import annotations


class ExportError(Exception):
    """A policy cannot be exported as asked; the message names what and says what to do."""


class ParityError(ExportError):
    """The exported artifact does not reproduce the SB3 policy's outputs."""
