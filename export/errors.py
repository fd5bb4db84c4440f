"""Errors and exit codes shared by the stages (standard library only).

Every command exits ``EXIT_OPTIONS`` for bad options (click's own usage errors use the same code);
the table of every command's exit codes is in the README ("Exit codes").
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and failed (validation, parity, build, an unusable bundle ...)
EXIT_OPTIONS = 2  # bad options: nothing was done


class OptionsError(ValueError):
    """The user's options are invalid; the message lists every problem and what is allowed.

    The CLI commands catch this (not every ValueError), so an internal bug that happens to raise a
    ValueError still shows its traceback instead of passing for a user error.
    """
