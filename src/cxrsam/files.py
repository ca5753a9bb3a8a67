"""File helpers: atomic writes (outputs and checkpoints are never left half-written), input checks, hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cxrsam.errors import CxrsamError

_UMASK = os.umask(0)
os.umask(_UMASK)


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
