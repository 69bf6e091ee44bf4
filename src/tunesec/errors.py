"""Errors that tunesec reports to users.

A :class:`UsageError` is bad input that the user can fix (a missing file, an unknown name, a malformed config).
The CLI prints its message on one line and exits with code 2, without a traceback (``--debug`` shows one).
"""

from __future__ import annotations


class TunesecError(Exception):
    """Base class of the errors tunesec raises on purpose."""


class UsageError(TunesecError):
    """Bad input: the message names the file or field and what was expected. Exit code 2."""

    exit_code = 2


class RunConflictError(UsageError):
    """An output directory holds a finished run, or another run's files, that would be overwritten."""
