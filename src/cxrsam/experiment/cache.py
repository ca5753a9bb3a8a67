"""Stage caching for experiments: a stage re-runs only when its inputs or settings change.

Each stage lives in ``<run>/<stage>/``. Its *key* is a JSON-able dict of everything it depends on
(settings, and the keys of the stages it reads). On success ``done.json`` records the key's hash,
the stage's result and its wall time. A stage whose ``done.json`` matches is skipped; a killed stage
(no ``done.json``) runs again and may resume from what it left (training resumes from ``last.pt``).

Paths inside the stages folder are stored relative to it (``@stages/<stage>/...``, :data:`ROOT_MARK`) in keys and
results, so a copied or moved experiment keeps its cache and reads its own stage folders, never the original's.
Records written before that rule (absolute paths hashed into the key) are still recognised where they are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrsam.files import atomic_write_text

log = logging.getLogger(__name__)


ROOT_MARK = "@stages"
"""Stands for the stages folder in stored keys and results."""


def key_hash(key: Any) -> str:
    """Stable 16-hex-digit hash of a JSON-able key (paths stringified, dict keys sorted)."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StageCache:
    """Runs named stages under ``root``, skipping those already done with the same key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def portable(self, value: Any) -> Any:
        """``value`` (JSON-able; paths may be ``Path`` or ``str``) with every path inside the stages folder written
        as ``@stages/<relative path>``."""
        if isinstance(value, dict):
            return {k: self.portable(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.portable(v) for v in value]
        if isinstance(value, (str, Path)):
            text = str(value)
            for root in dict.fromkeys((str(self.root), str(self.root.resolve()))):
                if text == root or text.startswith(root + "/"):
                    return ROOT_MARK + text[len(root):]
            return value
        return value

    def local(self, value: Any) -> Any:
        """The inverse of :meth:`portable` for this stages folder."""
        if isinstance(value, dict):
            return {k: self.local(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.local(v) for v in value]
        if isinstance(value, str) and (value == ROOT_MARK or value.startswith(ROOT_MARK + "/")):
            return str(self.root) + value[len(ROOT_MARK):]
        return value

    def done(self, name: str) -> dict | None:
        """The ``done.json`` record of a stage (its paths inside this stages folder), or None."""
        path = self.root / name / "done.json"
        if not path.exists():
            return None
        record = json.loads(path.read_text())
        return {**record, "result": self.local(record["result"])}

    def run(self, name: str, key: Any, fn: Callable[[Path], dict]) -> dict:
        """Run ``fn(stage_dir) -> result`` unless stage ``name`` is done with this ``key``; return the result.

        The returned dict also carries ``"key"`` (the key hash, for downstream keys) and ``"seconds"``.
        """
        stage_dir = self.root / name
        digest = key_hash(self.portable(key))
        accepted = {digest, key_hash(key)}  # the second: a record from before paths were stored relative
        record = self.done(name)
        if record and record["key"] in accepted:
            log.info("stage %s: cached (%s)", name, record["key"])
            self.skipped.append(name)
            return {**record["result"], "key": record["key"], "seconds": record["seconds"]}
        previous = stage_dir / "stage.json"
        if stage_dir.exists() and previous.exists() and json.loads(previous.read_text())["key"] not in accepted:
            log.info("stage %s: settings changed, starting it again", name)
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(previous, json.dumps({"key": digest, "inputs": self.portable(key)}, indent=2, default=str))
        log.info("stage %s: running", name)
        start = time.perf_counter()
        result = fn(stage_dir)
        seconds = time.perf_counter() - start
        atomic_write_text(stage_dir / "done.json", json.dumps(
            {"key": digest, "result": self.portable(result), "seconds": seconds}, indent=2, default=str))
        self.ran.append(name)
        return {**result, "key": digest, "seconds": seconds}
