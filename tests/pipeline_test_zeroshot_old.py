"""run_zero_shot and `cxrsam zero-shot` / `cxrsam weights` on phantoms: files by stem, drafts, errors."""

from __future__ import annotations

import shutil
import sys
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest

from cxrsam.data.io import list_images, read_image, read_mask, write_mask
from cxrsam.errors import CxrsamError
from cxrsam.evaluation.metrics import dice_score
from cxrsam.prompts import prompts_from_mask
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.registry import build_sam
from cxrsam.sam.testing import tiny_spec
from cxrsam.sam.zeroshot import drafts_from_path, image_seed, run_zero_shot


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``cxrsam ARGS`` in this process through the real entry point: (exit code, stdout, stderr)."""
    from cxrsam.cli import main

    monkeypatch.setattr(sys, "argv", ["cxrsam", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return SamEngine(build_sam(tiny_spec(), checkpoint=tiny_checkpoint))


@pytest.mark.parametrize("mode", ["box", "points", "box+points"])
def test_masks_by_stem_match_the_engine(engine, phantoms, tmp_path, mode):
    result = run_zero_shot(phantoms / "images", tmp_path / "out", prompt=mode, drafts=phantoms / "masks",
                           points_per_lung=2, strategy="random", seed=5, engine=engine, progress=False)
    stems = sorted(p.stem for p in list_images(phantoms / "images"))
    assert sorted(p.stem for p in result.written) == stems and not result.missing_drafts
    report = pd.read_csv(result.report)
    assert sorted(report.stem) == stems and (report.prompt_sets == 2).all()
    first = list_images(phantoms / "images")[0]
    xray = read_image(first)
    prompts = prompts_from_mask(read_mask(phantoms / "masks" / first.name), mode=mode, points_per_lung=2,
                                strategy="random", rng=np.random.default_rng(image_seed(5, first.stem)))
    written = read_mask(tmp_path / "out" / f"{first.stem}.png")
    assert written.shape == xray.size
    assert np.array_equal(written, engine.segment(xray, prompts))


def test_missing_and_empty_drafts_are_reported(engine, phantoms, tmp_path):
    drafts = tmp_path / "drafts"
    shutil.copytree(phantoms / "masks", drafts)
    masks = sorted(drafts.iterdir())
    masks[0].unlink()
    write_mask(masks[1], np.zeros((96, 96), bool))
    result = run_zero_shot(phantoms / "images", tmp_path / "out", drafts=drafts, engine=engine, progress=False)
    assert result.missing_drafts == [masks[0].stem]
    assert "no lung component" in result.warnings[masks[1].stem][0]
    assert not read_mask(tmp_path / "out" / masks[1].name).any()
    assert len(result.written) == 11


def test_drafts_from_memory_and_source_errors(engine, phantoms, tmp_path):
    stem = list_images(phantoms / "images")[0].stem
    drafts = {stem: read_mask(phantoms / "masks" / f"{stem}.png")}
    result = run_zero_shot(phantoms / "images", tmp_path / "out", drafts=drafts, engine=engine, progress=False)
    assert [p.stem for p in result.written] == [stem] and len(result.missing_drafts) == 11
    with pytest.raises(CxrsamError, match="exactly one source"):
        run_zero_shot(phantoms / "images", tmp_path / "o2", engine=engine)
    with pytest.raises(CxrsamError, match="no image had a draft"):
        run_zero_shot(phantoms / "images", tmp_path / "o3", drafts={"other": drafts[stem]}, engine=engine,
                      progress=False)
    (tmp_path / "none").mkdir()
    with pytest.raises(CxrsamError, match="no images in folder"):
        run_zero_shot(tmp_path / "none", tmp_path / "o4", drafts=drafts, engine=engine)


def test_drafts_from_a_cnn_run(engine, phantoms, tmp_path):
    from cxrsam.baselines.predict import load_cnn_run
    from cxrsam.baselines.config import make_config
    from cxrsam.train.cnn import train_cnn

    config = make_config(arch="unet", data=phantoms, size=64, epochs=1, batch_size=4, split=(0.75, 0.25, 0.0))
    run = train_cnn(config, tmp_path / "cnn")
    result = run_zero_shot(phantoms / "images", tmp_path / "out", drafts_from=run, engine=engine, progress=False)
    assert len(result.written) + len(result.missing_drafts) == 12 and not result.missing_drafts
    predictor = load_cnn_run(run)
    first = list_images(phantoms / "images")[0]
    draft = predictor.predict(read_image(first).pixels)
    expected = engine.segment(read_image(first), prompts_from_mask(
        draft, rng=np.random.default_rng(image_seed(0, first.stem))))
    assert np.array_equal(read_mask(tmp_path / "out" / f"{first.stem}.png"), expected)
    # one entry point for both kinds of draft source: a run folder predicts, a mask folder is read
    xray = read_image(first)
    assert np.array_equal(drafts_from_path(run)(xray), np.asarray(draft) > 0)
    assert np.array_equal(drafts_from_path(phantoms / "masks")(xray), read_mask(phantoms / "masks" / first.name))


def test_cli_zero_shot_with_litemedsam(phantoms, tmp_path, monkeypatch, capsys):
    images, drafts = tmp_path / "images", tmp_path / "drafts"
    images.mkdir()
    drafts.mkdir()
    for path in list_images(phantoms / "images")[:2]:
        shutil.copy(path, images / path.name)
        shutil.copy(phantoms / "masks" / path.name, drafts / path.name)
    code, stdout, stderr = run_cli(monkeypatch, capsys, "zero-shot", "--images", str(images), "--drafts",
                                   str(drafts), "--prompt", "box", "--out", str(tmp_path / "out"),
                                   "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, stderr
    assert "wrote 2 mask(s)" in stdout
    for path in images.iterdir():
        mask = read_mask(tmp_path / "out" / path.name)
        truth = read_mask(drafts / path.name)
        assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.5  # a real model on a phantom
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    def one_line_error(*args: str) -> str:
        code, _, stderr = run_cli(monkeypatch, capsys, *args)
        assert code == 1 and stderr.strip().count("\n") == 0, stderr
        return " ".join(stderr.split())

    common = ("--images", str(tmp_path), "--drafts", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "--prompt must be one of" in one_line_error("zero-shot", *common, "--prompt", "scribble")
    assert "--negative must be one of" in one_line_error("zero-shot", *common, "--negative", "heart")
    assert "no images in folder" in one_line_error("zero-shot", *common)
    monkeypatch.setenv("CXRSAM_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    message = one_line_error("weights", "download", "vit_b")
    assert "put sam_vit_b_01ec64.pth" in message and str(tmp_path / "w") in message
    code, stdout, _ = run_cli(monkeypatch, capsys, "weights", "list")
    assert code == 0 and "litemedsam" in stdout and "missing" in stdout


def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def test_dice_by_prompt_variant_encodes_each_image_once(engine, phantoms):
    from cxrsam.sam.zeroshot import dice_by_prompt_variant

    paths = list_images(phantoms / "images")[:3]
    xrays = [read_image(p) for p in paths]
    truths = [read_mask(phantoms / "masks" / p.name) for p in paths]
    variants = {"box": {"mode": "box"}, "points": {"mode": "points", "points_per_lung": 2, "multimask": True}}
    fresh = SamEngine(engine.loaded)
    frame = dice_by_prompt_variant(fresh, xrays, truths, {"truth": truths, "shifted": [np.roll(t, 3, axis=1) for t in truths]},
                                   variants, only={"shifted": ["box"]}, progress=False)
    assert fresh.images_encoded == 3
    assert frame.groupby(["source", "variant"]).size().to_dict() == {
        ("shifted", "box"): 3, ("truth", "box"): 3, ("truth", "points"): 3}
    box = frame[(frame.source == "truth") & (frame.variant == "box")]
    expected = [dice_score(fresh.segment(x, prompts_from_mask(t, rng=np.random.default_rng(image_seed(0, x.path.stem)))),
                           t) for x, t in zip(xrays, truths)]
    assert np.allclose(box.dice.to_numpy(), expected) and (frame.components == 2).all()
