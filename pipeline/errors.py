"""Errors that mean "the input is wrong": shown to the user as one line, never as a traceback."""


class StrataError(Exception):
    """Bad input or a refused operation; the message names the file, row or field."""


class ConfigError(StrataError):
    """A config file or override is invalid."""


class DataError(StrataError):
    """A task's data is missing, empty, unreadable or mislabelled."""


class StoreError(StrataError):
    """The memory store is corrupt, incomplete or belongs to another model."""
