"""File helpers: atomic writes (outputs and checkpoints are never left half-written), input and output
checks, hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
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


def cache_home() -> Path:
    """cxrsam's cache folder: ``$CXRSAM_CACHE``, else ``~/.cache/cxrsam`` (ONNX exports, the hash memo)."""
    env = os.environ.get("CXRSAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cxrsam"


HASH_MEMO = "sha256.json"
"""File in :func:`cache_home` remembering the SHA-256 of large files by their stat (:func:`sha256_file`)."""
HASH_MEMO_MIN_BYTES = 1 << 22
"""Files from this size (4 MiB) on are remembered; smaller ones are hashed faster than the memo is read."""
HASH_MEMO_ITEMS = 256
"""Most files the memo remembers (the most recently hashed)."""


def _file_stamp(path: Path) -> list[int]:
    """What changes whenever a file's bytes do: device, inode, size, modification and status-change times (ns;
    the status-change time cannot be set back by a user, so a rewrite that restores the old size and modification
    time still changes the stamp)."""
    stat = path.stat()
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _read_memo(memo: Path) -> dict[str, dict]:
    try:
        table = json.loads(memo.read_text(encoding="utf-8"))
        return table if isinstance(table, dict) else {}
    except (OSError, ValueError):  # absent, unreadable or damaged: hash again
        return {}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks.

    Files of at least :data:`HASH_MEMO_MIN_BYTES` are remembered in ``<cache_home>/sha256.json`` by their stat
    (:func:`_file_stamp`, taken before reading): the same path with the same stamp is not read again (checkpoints
    and ONNX graphs are hashed at every start: 2.5 GB for ViT-H). A memo that cannot be read or written is ignored.
    """
    path = Path(path)
    stamp = _file_stamp(path)
    remember = stamp[2] >= HASH_MEMO_MIN_BYTES
    memo, key = cache_home() / HASH_MEMO, str(path.resolve())
    if remember:
        known = _read_memo(memo).get(key)
        if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
            return known["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    hexdigest = digest.hexdigest()
    if remember:
        table = _read_memo(memo)  # read again: another process may have added entries meanwhile
        table.pop(key, None)
        table[key] = {"stamp": stamp, "sha256": hexdigest}
        with contextlib.suppress(OSError):  # a read-only cache costs only the next hash
            atomic_write_text(memo, json.dumps(dict(list(table.items())[-HASH_MEMO_ITEMS:])) + "\n")
    return hexdigest


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
