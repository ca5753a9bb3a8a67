"""Discovery of chest X-ray datasets on disk.

Each layout turns a root folder into a list of :class:`Case` (an image and the mask files whose
union is the lung mask). Problems found on the way (missing masks, orphans) are collected, not
raised, so ``cxrsam data summary`` can list them all.

Layouts (``--layout``):

``covid19``
    COVID-19 Radiography Database: ``<root>/<Class>/images/*.png`` + ``<root>/<Class>/masks/*.png``
    (same file name). Classes: ``COVID``, ``Normal``, ``Lung_Opacity``, ``Viral Pneumonia``.
``montgomery``
    ``CXR_png/*.png`` + ``ManualMask/leftMask/*.png`` + ``ManualMask/rightMask/*.png``.
``shenzhen``
    ``CXR_png/*.png`` + ``mask/<stem>_mask.png``.
``jsrt``
    JSRT raw ``*.IMG`` (anywhere under the root) + SCR ``masks/left lung/<stem>.gif`` and
    ``masks/right lung/<stem>.gif``.
``folder``
    ``images/`` + ``masks/`` matched by file stem (a mask may carry a ``_mask`` suffix).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxrsam.data.io import IMAGE_SUFFIXES
from cxrsam.errors import CxrsamError

COVID19_CLASSES = ("COVID", "Normal", "Lung_Opacity", "Viral Pneumonia")
LAYOUTS = ("covid19", "montgomery", "shenzhen", "jsrt", "folder")


@dataclass
class Case:
    """One image and its lung mask files.

    Attributes:
        case_id: unique, stable id (``<class>/<stem>`` for class layouts, else the stem).
        image: path of the image.
        masks: mask files whose union is the lung mask (one file, or left + right).
        sides: side label of each entry of ``masks`` (``"both"``, ``"left"`` or ``"right"``).
        group: class name (COVID-19 layout) or the layout name.
    """

    case_id: str
    image: Path
    masks: list[Path]
    sides: list[str]
    group: str


@dataclass
class Discovery:
    """What a layout found: usable cases and the problems (path, message) met on the way."""

    layout: str
    root: Path
    cases: list[Case] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)


def _files(folder: Path, suffixes: set[str] = IMAGE_SUFFIXES) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in suffixes)


def _pair_by_stem(images: list[Path], masks: list[Path], found: Discovery, group: str, prefix: str = "",
                  mask_stem: Callable[[str], str] = lambda s: s) -> None:
    by_stem: dict[str, Path] = {}
    for m in masks:
        stem = m.stem
        by_stem[stem.removesuffix("_mask") if stem.endswith("_mask") else stem] = m
    image_stems = set()
    for img in images:
        image_stems.add(img.stem)
        mask = by_stem.get(mask_stem(img.stem)) or by_stem.get(img.stem)
        if mask is None:
            found.problems.append((img, "image without mask"))
            continue
        found.cases.append(Case(f"{prefix}{img.stem}", img, [mask], ["both"], group))
    for stem, m in by_stem.items():
        if stem not in image_stems:
            found.problems.append((m, "mask without image"))


def discover_covid19(root: Path, classes: Sequence[str] | None = None) -> Discovery:
    found = Discovery("covid19", root)
    present = sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "images").is_dir())
    wanted = list(classes) if classes else present
    for cls in wanted:
        if cls not in present:
            found.problems.append((root / cls, "class folder not found (or has no images/ folder)"))
            continue
        _pair_by_stem(_files(root / cls / "images"), _files(root / cls / "masks"), found, cls, prefix=f"{cls}/")
    return found


def _pair_sides(images: list[Path], left: list[Path], right: list[Path], found: Discovery, layout: str) -> None:
    """Cases from images with one mask file per lung (same stem); an image lacking either side is a
    problem, not a case (scoring it against one lung would be wrong)."""
    tables = {"left": {p.stem: p for p in left}, "right": {p.stem: p for p in right}}
    for img in images:
        missing = [side for side, table in tables.items() if img.stem not in table]
        if missing:
            found.problems.append((img, f"image without {' and '.join(missing)} lung mask"))
        else:
            found.cases.append(Case(img.stem, img, [tables["left"][img.stem], tables["right"][img.stem]],
                                    ["left", "right"], layout))


def discover_montgomery(root: Path) -> Discovery:
    found = Discovery("montgomery", root)
    _pair_sides(_files(root / "CXR_png"), _files(root / "ManualMask" / "leftMask"),
                _files(root / "ManualMask" / "rightMask"), found, "montgomery")
    return found


def discover_shenzhen(root: Path) -> Discovery:
    found = Discovery("shenzhen", root)
    _pair_by_stem(_files(root / "CXR_png"), _files(root / "mask"), found, "shenzhen")
    return found


def discover_jsrt(root: Path) -> Discovery:
    found = Discovery("jsrt", root)
    masks_root = next((p for p in [root / "masks", *root.glob("*/masks")] if p.is_dir()), root / "masks")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".img" and p.is_file())
    _pair_sides(images, _files(masks_root / "left lung"), _files(masks_root / "right lung"), found, "jsrt")
    return found


def discover_folder(root: Path) -> Discovery:
    found = Discovery("folder", root)
    _pair_by_stem(_files(root / "images"), _files(root / "masks"), found, "folder")
    return found


def detect_layout(root: Path) -> str:
    """Guess the layout of ``root`` from its folder names."""
    if (root / "ManualMask").is_dir() and (root / "CXR_png").is_dir():
        return "montgomery"
    if (root / "CXR_png").is_dir() and (root / "mask").is_dir():
        return "shenzhen"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    if any((d / "images").is_dir() and (d / "masks").is_dir() for d in root.iterdir() if d.is_dir()):
        return "covid19"
    if any(root.rglob("*.IMG")) or any(root.rglob("*.img")):
        return "jsrt"
    raise CxrsamError("unknown dataset layout (expected one of: " + ", ".join(LAYOUTS) + "; name it with --layout)",
                      path=root)


def discover(root: str | Path, layout: str = "auto", classes: Sequence[str] | None = None) -> Discovery:
    """Find all image/mask cases under ``root``.

    Args:
        root: dataset folder.
        layout: one of :data:`LAYOUTS` or ``"auto"``.
        classes: COVID-19 layout only: class folders to use (default: all present).
    """
    root = Path(root)
    if not root.is_dir():
        raise CxrsamError("dataset folder not found", path=root)
    if layout == "auto":
        layout = detect_layout(root)
    finders: dict[str, Callable[[Path], Discovery]] = {
        "covid19": lambda r: discover_covid19(r, classes),
        "montgomery": discover_montgomery,
        "shenzhen": discover_shenzhen,
        "jsrt": discover_jsrt,
        "folder": discover_folder,
    }
    if layout not in finders:
        raise CxrsamError(f"unknown layout {layout!r} (choose from {', '.join(LAYOUTS)})", path=root)
    return finders[layout](root)


def require_cases(found: Discovery) -> list[Case]:
    """The discovered cases, or a one-line error if there are none."""
    if not found.cases:
        raise CxrsamError(f"no image/mask pairs found with layout {found.layout!r}", path=found.root)
    return found.cases
