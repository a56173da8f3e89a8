"""Errors a user can cause. The CLI prints these without a traceback and exits non-zero."""


class QuantkitError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class SourceError(QuantkitError):
    """A checkpoint file or folder is missing, truncated or malformed."""


class ConfigError(QuantkitError):
    """config.json is missing or lacks what the architecture needs."""


class UnsupportedArchitectureError(QuantkitError):
    """The checkpoint's architecture has no module in quantkit.arch."""


class OutputError(QuantkitError):
    """An output location cannot be written: missing permission, a read-only file system, a full disk."""


class PublishError(QuantkitError):
    """A variant directory cannot be published as it is: missing files or eval results, a bad repo id, a staging
    folder holding something else, no hub token."""
