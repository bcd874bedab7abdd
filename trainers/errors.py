"""Errors a user can fix. The CLI prints them as one line, without a traceback."""

from __future__ import annotations


class FulcrumError(Exception):
    """Something the user can fix: the message says what was wrong and what to do."""

    exit_code = 1


class SpecError(FulcrumError):
    """The job spec is invalid (unknown field, wrong type, missing file, ...)."""

    exit_code = 2


class DataError(FulcrumError):
    """A data file or row is unusable; the message names the file, the line or row and the field."""

    exit_code = 2


class DiskFull(FulcrumError):
    """A write found no space left; nothing half-written was kept. A run's driver turns it into its own
    line (which names the resume command)."""
