"""Meta's official segment_anything checkpoints: where they live, their hashes, and downloading them.

SHA-256 values are those published for the official files on dl.fbaipublicfiles.com (the same
values are pinned by micro-sam's model registry and many download scripts). The 6 hex digits in
each file name (``01ec64``, ``0b3195``, ``4b8939``) are the start of the file's **MD5**, not of its
SHA-256, so the name alone does not verify a file: the full SHA-256 below is checked.

Files are looked up in :func:`weights_dir`: ``$CXRSAM_WEIGHTS`` if set, else
``~/.cache/cxrsam/weights``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cxrsam.errors import CxrsamError
from cxrsam.files import atomic_path, sha256_file


@dataclass(frozen=True)
class OfficialWeights:
    """One official checkpoint: backend name, file name, URL and published SHA-256."""

    name: str
    filename: str
    url: str
    sha256: str


_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
OFFICIAL_WEIGHTS: dict[str, OfficialWeights] = {
    w.name: w for w in (
        OfficialWeights("vit_b", "sam_vit_b_01ec64.pth", _BASE_URL + "sam_vit_b_01ec64.pth",
                        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        OfficialWeights("vit_l", "sam_vit_l_0b3195.pth", _BASE_URL + "sam_vit_l_0b3195.pth",
                        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
        OfficialWeights("vit_h", "sam_vit_h_4b8939.pth", _BASE_URL + "sam_vit_h_4b8939.pth",
                        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    )
}


def weights_dir() -> Path:
    """Folder searched for official checkpoints: ``$CXRSAM_WEIGHTS`` or ``~/.cache/cxrsam/weights``."""
    env = os.environ.get("CXRSAM_WEIGHTS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cxrsam" / "weights"


def official(name: str) -> OfficialWeights:
    """The official checkpoint of backend ``name`` (``vit_b``, ``vit_l``, ``vit_h``)."""
    if name not in OFFICIAL_WEIGHTS:
        raise CxrsamError(f"no official download for {name!r}; choose one of {', '.join(OFFICIAL_WEIGHTS)}")
    return OFFICIAL_WEIGHTS[name]


def find_weights(name: str, directory: str | Path | None = None) -> Path | None:
    """Path of the official file of ``name`` in ``directory`` (default :func:`weights_dir`), or None."""
    path = Path(directory or weights_dir()) / official(name).filename
    return path if path.is_file() else None


def download_weights(name: str, directory: str | Path | None = None, timeout_s: float = 30.0,
                     progress: bool = True) -> Path:
    """Download the official checkpoint ``name`` into ``directory`` and verify its SHA-256.

    The file streams into a temporary file beside the target, hashed on the way, and is renamed
    only when complete and correct; an interrupted or failed download leaves nothing behind. A
    file already present with the right hash is kept (no download). Offline or on HTTP errors a
    one-line :class:`CxrsamError` says where to put the file by hand.

    Returns:
        the path of the verified file.
    """
    weights = official(name)
    folder = Path(directory or weights_dir())
    target = folder / weights.filename
    if target.is_file():
        if sha256_file(target) == weights.sha256:
            return target
        raise CxrsamError(f"existing file does not match the published SHA-256 {weights.sha256}; "
                          "delete it and download again", path=target)
    hint = f"put {weights.filename} (SHA-256 {weights.sha256}) in {folder}, or pass --checkpoint PATH"
    import urllib.error  # imported to download only: with its ssl, 0.08 s of every start otherwise
    import urllib.request

    try:
        response = urllib.request.urlopen(weights.url, timeout=timeout_s)  # noqa: S310 - fixed https URL
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CxrsamError(f"cannot download {weights.url} ({reason}); offline? {hint}") from None
    digest = hashlib.sha256()
    with response, atomic_path(target) as tmp:
        total = int(response.headers.get("Content-Length") or 0) or None
        from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

        with Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                      disable=not progress) as bar, tmp.open("wb") as handle:
            task = bar.add_task(f"downloading {weights.filename}", total=total)
            try:
                while block := response.read(1 << 20):
                    handle.write(block)
                    digest.update(block)
                    bar.advance(task, len(block))
            except (TimeoutError, OSError) as exc:
                raise CxrsamError(f"download of {weights.url} failed ({exc}); {hint}") from None
        if digest.hexdigest() != weights.sha256:
            raise CxrsamError(f"downloaded file has SHA-256 {digest.hexdigest()}, expected {weights.sha256} "
                              f"(corrupt transfer; nothing was saved)", path=target)
    return target
