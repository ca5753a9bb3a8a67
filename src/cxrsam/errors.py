"""The one exception type users see: a one-line message naming the file and the problem."""

from __future__ import annotations

from pathlib import Path


class CxrsamError(Exception):
    """A problem with the user's input or files, reported as one line by the CLI.

    Raise it with the offending path so the message always says *which* file failed::

        raise CxrsamError("unreadable image (truncated PNG)", path=p)
    """

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else Path(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)
