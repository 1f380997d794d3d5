"""Errors that end an audit, each carrying the exit code of the contract."""

from __future__ import annotations


class TieauditError(Exception):
    """Base class: a one-line, user-facing message and an exit code."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputError(TieauditError):
    """The input exists but cannot be read or is corrupt (exit 2)."""

    exit_code = 2


class UsageError(TieauditError):
    """The command line or API call is wrong (exit 2)."""

    exit_code = 2


class WriteError(TieauditError):
    """An output could not be written (exit 2)."""

    exit_code = 2


class NothingToAudit(TieauditError):
    """PATH holds nothing tieaudit can audit (exit 3)."""

    exit_code = 3
