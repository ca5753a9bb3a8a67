"""File helpers: atomic writes (outputs and checkpoints are never left half-written), input and output
checks, hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cxrsam.errors import CxrsamError

_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>.*)$")
"""Names :func:`atomic_path` gives its temporary files: ``.<name>.<8 random characters>.tmp<suffix of name>``."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The rename is atomic on POSIX, so a reader (or a resumed run after a kill) sees either the
    old file or the complete new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def require_file(path: str | Path, kind: str = "file") -> Path:
    """``path`` if it is a non-empty file; else :class:`CxrsamError` naming it ("<kind> not found",
    "is a folder, expected a(n) <kind>", "empty <kind> (0 bytes)")."""
    path = Path(path)
    if not path.exists():
        raise CxrsamError(f"{kind} not found", path=path)
    if path.is_dir():
        raise CxrsamError(f"is a folder, expected {'an' if kind[0] in 'aeiou' else 'a'} {kind}", path=path)
    if path.stat().st_size == 0:
        raise CxrsamError(f"empty {kind} (0 bytes)", path=path)
    return path


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes by :func:`atomic_path` in ``folder`` left when they were
    killed (SIGKILL, power loss); returns them. Call it only while nothing writes in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for path in sorted(folder.iterdir()):
        match = _TEMP_NAME.match(path.name)
        if match and path.is_file() and Path(match["target"]).suffix == match["suffix"]:
            path.unlink(missing_ok=True)
            stale.append(path)
    return stale


def _require_creatable(path: Path) -> None:
    """Refuse ``path`` (absent) when its nearest existing parent is not a folder or not writable."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CxrsamError(f"cannot be created: {parent} is not a folder", path=path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CxrsamError(f"cannot be created: no permission to write in {parent}", path=path)


def require_output_dir(path: str | Path) -> Path:
    """``path`` if outputs can be written into it: a writable folder, or absent with a writable parent (not
    created here). Else :class:`CxrsamError` naming it, before any work is done."""
    path = Path(path)
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise CxrsamError("output folder is not writable (no permission)", path=path)
    elif path.exists():
        raise CxrsamError("exists and is not a folder; give a folder for the outputs", path=path)
    else:
        _require_creatable(path)
    return path


def require_output_file(path: str | Path) -> Path:
    """``path`` if a file can be written there (an existing file is replaced). Else :class:`CxrsamError`
    naming it (a folder, a parent that is not a folder or not writable), before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise CxrsamError("is a folder; give a file name for the output", path=path)
    if path.parent.is_dir():
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise CxrsamError(f"cannot be written: no permission to write in {path.parent}", path=path)
    else:
        _require_creatable(path)
    return path
