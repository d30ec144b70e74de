"""Errors users see.

Contract: every failure caused by the user's input (a path, a model type, a sampling parameter, a data line) is
raised as a `DiffusionVLError` (a `ValueError`) whose message is one actionable line. The CLI prints it as
`error: <message>` and exits with status 2, never with a traceback. Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations


class DiffusionVLError(ValueError):
    """A user-facing error with a one-line, actionable message."""


def check(condition: bool, message: str) -> None:
    """Raise `DiffusionVLError(message)` unless `condition` holds."""
    if not condition:
        raise DiffusionVLError(message)
