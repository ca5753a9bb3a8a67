"""Comparison table, figures and report files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrsam.report import MethodInfo, ReportContent, comparison_table, dice_boxplot, overlay_grid, write_report
from cxrsam.report.tables import VS_REFERENCE


def _per_image() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.85, 0.95, 30)
    rows = []
    for method, shift in (("A", 0.0), ("B", 0.03)):
        for i, d in enumerate(base + shift):
            rows.append({"method": method, "name": f"img{i}", "dice": d, "iou": d / (2 - d), "precision": d,
                         "recall": d, "hd95": 10 * (1 - d), "assd": 2 * (1 - d)})
    return pd.DataFrame(rows)


def test_comparison_table_values():
    per_image = _per_image()
    table = comparison_table(per_image, [MethodInfo("A", params_total=10), MethodInfo("B", params_trainable=5)],
                             reference="B")
    assert list(table["method"]) == ["A", "B"]
    a = table.set_index("method").loc["A"]
    assert a["dice_mean"] == pytest.approx(per_image[per_image.method == "A"].dice.mean())
    assert a["dice_ci_low"] < a["dice_mean"] < a["dice_ci_high"]
    assert a["p_vs_reference"] < 1e-5  # B is A + 0.03 on every image
    assert a["dice_diff_vs_reference"] == pytest.approx(-0.03)
    assert a["dice_diff_ci_low"] == pytest.approx(-0.03) and a["dice_diff_ci_high"] == pytest.approx(-0.03)
    assert (a["images_better"], a["images_worse"]) == (0, 30)
    assert table.set_index("method").loc["B", list(VS_REFERENCE)].isna().all()


def test_report_files(tmp_path):
    per_image = _per_image()
    table = comparison_table(per_image, [MethodInfo("A"), MethodInfo("B")], reference="B")
    img = np.random.default_rng(1).random((32, 32))
    gt = np.zeros((32, 32), bool)
    gt[8:24, 8:24] = True
    figs = {
        "Dice per image": dice_boxplot(per_image, ["A", "B"], tmp_path / "fig" / "box.png"),
        "Examples": overlay_grid(per_image, ["A", "B"], lambda n: img, lambda n: gt, lambda m, n: np.roll(gt, 2, 0),
                                 tmp_path / "fig" / "overlays.png"),
    }
    md, page = write_report(ReportContent("Test report", table, "B", figs, config_text="seed: 0\n"), tmp_path)
    text = md.read_text()
    assert "| A |" in text and "fig/box.png" in text and "seed: 0" in text
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 2 and "<td>B</td>" in html
    assert figs["Dice per image"].read_bytes()[:4] == b"\x89PNG"


def test_lung_area_histogram_and_quality_note(tmp_path):
    import json

    from cxrsam.report import lung_area_histogram
    from cxrsam.report.tables import quality_note

    path = lung_area_histogram({"a": [0.2, 0.25, 0.3], "b": [0.1, 0.15]}, tmp_path / "areas.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stem, status, reasons in (("x", "ok", []), ("y", "review", [{"flag": "lung_count", "message": "1 lung"}])):
        (tmp_path / f"{stem}.json").write_text(json.dumps({"quality": {"status": status, "reasons": reasons}}))
    note = quality_note({"SAM": tmp_path, "CNN without JSON": tmp_path / "none"}, ["x", "y", "z"])
    assert note == ("Quality flags (test images sent to review / images; most frequent flags): "
                    "SAM: 1/2 (lung_count 1).")
    assert quality_note({"CNN": tmp_path / "none"}, ["x"]) is None
