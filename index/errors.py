"""Errors raised by the reference index.

They subclass :class:`ValueError` so callers that only know "bad input" still catch them, while
the service can map each one to a precise HTTP status (e.g. an empty index is a 503 "enroll
references first", not a 500).
"""

from __future__ import annotations

__all__ = ["EmptyIndexError", "IndexFileError"]


class IndexFileError(ValueError):
    """An index file is truncated, corrupt, of another format or of an unsupported version.

    Raised *instead of* returning an index, so a damaged file can never answer a query.
    """


class EmptyIndexError(ValueError):
    """A search was asked of an index (or of a method) that holds no usable references."""
