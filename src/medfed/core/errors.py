"""The one exception hierarchy of medfed.

Every error a user can cause derives from :class:`MedfedError`; its message says what is
wrong, where (field path, site, file) and, where it helps, what to do. The CLI prints the
message without a traceback and exits non-zero.
"""

from __future__ import annotations


class MedfedError(Exception):
    """Base class of all errors medfed raises on purpose."""


class ConfigError(MedfedError):
    """A job file is missing, unreadable or invalid. The message names the field path."""


class DataError(MedfedError):
    """Input data is missing, corrupt, of the wrong shape or dtype, or holds NaN.

    The message names the site (when known) and the file or array.
    """


class ModelError(MedfedError):
    """A model cannot be built for the requested task or input."""


class RunDirError(MedfedError):
    """The output folder cannot be used (it already holds a run, or is not writable)."""


class NetworkError(MedfedError):
    """The server cannot listen on its address (taken, or not this machine's)."""


class SiteError(MedfedError):
    """A site failed while training or evaluating. Carries the site name and the cause."""

    def __init__(self, site: str, cause: str):
        super().__init__(f"site '{site}': {cause}")
        self.site = site
        self.cause = cause


class RoundError(MedfedError):
    """A round could not complete, e.g. fewer sites answered than the quorum needs."""


class CodecError(MedfedError):
    """A serialized payload is malformed, truncated or does not match what was expected."""
