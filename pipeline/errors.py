"""Errors that mean "the input is wrong": shown to the user as one line, never as a traceback."""

import signal


class StrataError(Exception):
    """Bad input or a refused operation; the message names the file, row or field."""


class ConfigError(StrataError):
    """A config file or override is invalid."""


class DataError(StrataError):
    """A task's data is missing, empty, unreadable or mislabelled."""


class StoreError(StrataError):
    """The memory store is corrupt, incomplete or belongs to another model."""


class DivergedError(StrataError):
    """Training produced a non-finite loss or gradient; nothing of that task is kept."""


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM stopped a run (a BaseException, like KeyboardInterrupt: never swallowed
    by ``except Exception``); the command exits 128 + the signal number."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by signal {signum}")
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name
