"""Errors shared by the stages (standard library only)."""

from __future__ import annotations


class OptionsError(ValueError):
    """The user's options are invalid; the message lists every problem and what is allowed.

    The CLI commands catch this (not every ValueError), so an internal bug that happens to raise a
    ValueError still shows its traceback instead of passing for a user error.
    """
