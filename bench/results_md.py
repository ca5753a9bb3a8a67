"""Shared by the bench scripts: replace one ``## `` section of docs/results.md, leaving the others alone."""

from __future__ import annotations

import re
from pathlib import Path

from cxrsam.files import atomic_write_text


def replace_section(path: Path, heading: str, section: str) -> None:
    """Put ``section`` (starting with the line ``heading``) in place of the file's section with that heading.

    The old section runs from its heading line to the next ``## `` heading or the end of the file; when
    there is none, ``section`` is appended. A missing file is created with a ``# Results`` title.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else "# Results\n\n"
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text.rstrip("\n") + "\n")
