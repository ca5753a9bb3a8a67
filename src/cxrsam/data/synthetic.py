"""Synthetic CXR-like phantoms: the embedded default data for the demo and fast tests.

Each phantom has a bright body outline, two dark lung fields with random shape, a bright
mediastinum and heart between them, curved ribs over the lungs, blur and noise. The lung mask
is the union of both lung fields. This is a stand-in for data, not a substitute for real CXR.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from rich.progress import track

from cxrsam.data.io import write_mask
from cxrsam.files import atomic_path


def _lung_polygon(rng: np.random.Generator, cx: float, cy: float, w: float, h: float, side: int) -> np.ndarray:
    """A lung-like closed contour (N, 2) in pixel coordinates; ``side`` -1 (image left) or +1."""
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = 1 + 0.06 * np.sin(3 * t + rng.uniform(0, 6.3)) + 0.04 * np.sin(5 * t + rng.uniform(0, 6.3))
    x = np.cos(t) * r
    y = np.sin(t) * r
    # Pointed apex at the top, broad flat base; medial side straighter (mediastinum).
    y = np.where(y < 0, y * (1 + 0.25 * (1 - np.abs(x))), y * 0.85)
    medial = (x * -side) > 0
    x = np.where(medial, x * 0.7, x)
    return np.stack([cx + x * w / 2, cy + y * h / 2], axis=1)


def make_phantom(size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: image uint8 (size, size) and lung mask bool (size, size)."""
    rng = np.random.default_rng(seed)
    s = size
    img = np.full((s, s), rng.uniform(0.02, 0.12), np.float32)
    body = np.zeros((s, s), np.uint8)
    cv2.ellipse(body, (int(s * rng.uniform(0.47, 0.53)), int(s * 0.55)),
                (int(s * rng.uniform(0.42, 0.48)), int(s * 0.6)), 0, 0, 360, 1, -1)
    img[body > 0] = rng.uniform(0.55, 0.7)
    mask = np.zeros((s, s), np.uint8)
    gap = rng.uniform(0.05, 0.09) * s
    for side in (-1, 1):
        w = rng.uniform(0.26, 0.34) * s
        h = rng.uniform(0.5, 0.62) * s
        cx = s / 2 + side * (gap + w / 2)
        cy = s * rng.uniform(0.45, 0.52)
        poly = _lung_polygon(rng, cx, cy, w, h, side)
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1)
    heart = np.zeros((s, s), np.uint8)
    cv2.ellipse(heart, (int(s * rng.uniform(0.52, 0.58)), int(s * rng.uniform(0.62, 0.7))),
                (int(s * rng.uniform(0.12, 0.16)), int(s * rng.uniform(0.1, 0.14))), rng.uniform(-20, 20),
                0, 360, 1, -1)
    mask[heart > 0] = 0
    lung = mask > 0
    img[lung] = rng.uniform(0.15, 0.3)
    # Lung texture (vessels) and ribs drawn over the lungs.
    texture = cv2.GaussianBlur(rng.normal(0, 1, (s, s)).astype(np.float32), (0, 0), s / 64)
    img[lung] += 0.05 * texture[lung]
    ribs = np.zeros((s, s), np.float32)
    xs = np.arange(s, dtype=np.float64)
    for k in range(rng.integers(8, 11)):
        y0 = s * (0.16 + 0.07 * k)
        ys = y0 + 0.5 * s * ((xs - s / 2) / s) ** 2 * rng.uniform(0.8, 1.2) + 0.04 * s * np.abs(xs - s / 2) / s
        pts = np.round(np.stack([xs, ys], axis=1)).astype(np.int32)
        cv2.polylines(ribs, [pts], False, 0.15, max(1, s // 80))
    img += ribs * lung
    img = cv2.GaussianBlur(img, (0, 0), max(0.6, s / 300))
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, rng.uniform(0.01, 0.03), (s, s)).astype(np.float32)
    image = (np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25) * 255).astype(np.uint8)
    return image, lung


def generate_phantoms(out: str | Path, n: int = 40, size: int = 256, seed: int = 0,
                      progress: bool = True) -> Path:
    """Write ``n`` phantoms in the generic layout: ``out/images/phantom-XXXX.png`` + ``out/masks/``.

    Deterministic: the same ``(n, size, seed)`` writes byte-identical files.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    items = range(n)
    for i in track(items, description="phantoms", disable=not progress, transient=True):
        image, lung = make_phantom(size, seed=seed * 100_003 + i)
        name = f"phantom-{i:04d}.png"
        with atomic_path(out / "images" / name) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        write_mask(out / "masks" / name, lung)
    return out
