"""`cxrsam data summary` and `cxrsam evaluate` end to end, in a subprocess like a user runs them or in this
process (``cli``, the same ``main()``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrsam.data.io import read_mask, write_mask
from cxrsam.evaluation.metrics import dice_score


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrsam", *args], capture_output=True, text=True, timeout=300)


def test_summary_on_phantoms_with_problems(phantoms, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(phantoms, root)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_mask(root / "masks" / "broken.png", np.ones((8, 8)))
    Image.fromarray(np.zeros((96, 96), np.uint8)).save(root / "images" / "empty.png")
    write_mask(root / "masks" / "empty.png", np.zeros((96, 96)))
    res = run("data", "summary", str(root))
    assert res.returncode == 0, res.stderr
    assert "usable pairs: 12" in res.stdout
    assert "broken.png: unreadable image" in res.stdout or "broken.png: not an image" in res.stdout
    assert "empty mask" in res.stdout


def test_summary_fails_without_usable_pairs(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    res = run("data", "summary", str(tmp_path))
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no usable image/mask pairs" in lines[0] and "Traceback" not in res.stderr


def test_summary_real_data(shared_data):
    res = run("data", "summary", str(shared_data))
    assert res.returncode == 0 and "usable pairs: 1061" in res.stdout


def test_evaluate_perturbed_masks(phantoms, tmp_path):
    pred_dir = tmp_path / "pred"
    rng = np.random.default_rng(0)
    expected = {}
    gt_paths = sorted((phantoms / "masks").iterdir())
    for i, gt_path in enumerate(gt_paths[:-1]):  # the last one has no prediction
        gt = read_mask(gt_path)
        pred = np.roll(gt, int(rng.integers(-5, 6)), axis=1)
        pred[rng.random(gt.shape) < 0.01] = True
        if i == 0:
            pred = np.kron(pred, np.ones((2, 2), bool))  # another size: the ground truth is resized to it
        write_mask(pred_dir / gt_path.name, pred)
        expected[gt_path.stem] = dice_score(pred[::2, ::2] if i == 0 else pred, gt)
    out = tmp_path / "results.csv"
    res = run("evaluate", "--pred", str(pred_dir), "--gt", str(phantoms / "masks"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    frame = pd.read_csv(out)
    assert list(frame.columns[:7]) == ["name", "dice", "iou", "precision", "recall", "hd95", "assd"]
    assert len(frame) == 12
    got = dict(zip(frame["name"], frame["dice"]))
    for name, dice in expected.items():
        assert got[name] == pytest.approx(dice, abs=1e-5)
    assert got[gt_paths[-1].stem] == 0.0
    assert "missing prediction" in res.stderr and "95% CI" in res.stdout


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_evaluate_refuses_per_image_scores_the_others_and_fails_at_the_end(phantoms, cli, tmp_path):
    gt_dir, pred_dir, out = phantoms / "masks", tmp_path / "pred", tmp_path / "results.csv"
    gt_paths = sorted(gt_dir.iterdir())[:4]
    names = [p.stem for p in gt_paths]
    for path in gt_paths:
        write_mask(pred_dir / path.name, read_mask(path))
    write_mask(pred_dir / gt_paths[0].name, read_mask(gt_paths[0])[:, :48])  # half the width
    write_mask(pred_dir / f"{names[1]}_mask.png", read_mask(gt_paths[1]))     # a second file named like it
    res = cli("evaluate", "--pred", pred_dir, "--gt", gt_dir, "--out", out)
    assert res.returncode == 1
    lines = error_lines(res.stderr)
    assert len(lines) == 3 and lines[-1] == "error: 2 of 12 image(s) not scored (listed above)"
    assert lines[0] == (f"error: {pred_dir / gt_paths[0].name}: prediction is 48x96 but its ground truth "
                        f"{gt_paths[0]} is 96x96 (another aspect ratio)")
    assert lines[1].startswith(f"error: {pred_dir / gt_paths[1].name}: has the same name {names[1]!r} as "
                               f"{pred_dir / (names[1] + '_mask.png')}")
    frame = pd.read_csv(out)
    scored = frame.set_index("name")["dice"]
    assert len(scored) == 10 and (scored[names[2:4]] == 1.0).all() and (scored.drop(names[2:4]) == 0.0).all()
    assert "8 missing prediction(s)" in res.stderr  # the phantoms without a prediction, scored Dice 0


def test_evaluate_checks_out_before_scoring(cli, tmp_path, deny_write):
    empty_gt = tmp_path / "gt"  # scoring would fail on it: the --out problem must come first
    empty_gt.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep\n")
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_write(locked)
    for out, problem in ((tmp_path, "is a folder"), (a_file / "results.csv", f"{a_file} is not a folder"),
                         (locked / "results.csv", f"no permission to write in {locked}")):
        res = cli("evaluate", "--pred", tmp_path, "--gt", empty_gt, "--out", out)
        assert res.returncode == 1
        [line] = [line for line in res.stderr.splitlines() if line.strip()]
        assert line.startswith(f"error: {out}: ") and problem in line
    assert a_file.read_text() == "keep\n"


def test_file_names_that_look_like_console_markup_are_printed_as_they_are(phantoms, cli, tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    lungs = read_mask(sorted((phantoms / "masks").iterdir())[0])
    for name in ("[red]a", "[nostyle]b", "[bold]c"):  # [nostyle] is no style: rich raises on it
        write_mask(gt_dir / f"{name}.png", lungs)
    write_mask(pred_dir / "[red]a.png", lungs)
    (pred_dir / "[nostyle]b.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    res = cli("evaluate", "--pred", pred_dir, "--gt", gt_dir, "--out", tmp_path / "[i]r.csv")
    assert res.returncode == 1
    lines = error_lines(res.stderr)
    assert len(lines) == 2 and lines[0].startswith(f"error: {pred_dir / '[nostyle]b.png'}: not an image")
    assert "1 of 3 image(s) not scored" in lines[1]
    assert "1 missing prediction(s) (scored Dice 0): [bold]c" in res.stderr
    assert f"per-image results: {tmp_path / '[i]r.csv'}" in res.stdout
    assert list(pd.read_csv(tmp_path / "[i]r.csv")["name"]) == ["[bold]c", "[red]a"]
