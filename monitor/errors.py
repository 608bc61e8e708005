"""The few exceptions driftd raises on purpose. Each message says what is wrong and what to do."""

from __future__ import annotations


class DriftdError(Exception):
    """Base class: the CLI maps these to a one-line message and an exit code."""

    exit_code = 1


class ConfigError(DriftdError):
    """The configuration file or flags are invalid (exit code 2)."""

    exit_code = 2


class ContractError(DriftdError):
    """A log file or batch does not follow the log contract.

    ``reason`` is a short stable token (used as a metric label), ``column`` and ``row``
    point at the fault when known.
    """

    def __init__(self, message: str, *, reason: str, path: str = "", column: str = "", row: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.path = path
        self.column = column
        self.row = row


class ReferenceMissingError(DriftdError):
    """No reference set exists for a model_version, or it cannot be loaded."""


class StateError(DriftdError):
    """The checkpoint in the state directory cannot be used (corrupt, or from a newer driftd)."""
