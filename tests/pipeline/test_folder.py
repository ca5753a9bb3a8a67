"""The one folder pipeline behind `predict`, `zero-shot` and `predict-cnn`: same masks for the same prompts, the
same failures, outputs that feed back in as drafts, inputs never touched, and the prompt spec recorded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrsam.baselines.drafts import MaskFolderDrafts
from cxrsam.data.io import list_images, read_image, read_mask
from cxrsam.errors import CxrsamError
from cxrsam.pipeline import Segmenter, segment_images
from cxrsam.prompts import PromptSpec
from cxrsam.sam.registry import build_sam
from cxrsam.sam.testing import tiny_spec


@pytest.fixture()
def inputs(phantom_folders) -> tuple[Path, Path]:
    """Four phantom images (one of them unreadable) and their draft masks, in their own folders."""
    images, drafts = phantom_folders(3)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return images, drafts


@pytest.mark.parametrize("prompt", ["box", "points"])
def test_zero_shot_and_predict_give_identical_masks_and_fail_alike(cli, tiny_backend, inputs, tmp_path, prompt,
                                                                  folder_digest):
    images, drafts = inputs
    before = {**folder_digest(images), **{f"d/{k}": v for k, v in folder_digest(drafts).items()}}
    common = ["--images", images, "--drafts", drafts, "--backend", "tiny_sam", "--checkpoint", tiny_backend,
              "--prompt", prompt, "--strategy", "random", "--points-per-lung", "2", "--seed", "4"]
    zero = cli("zero-shot", *common, "--out", tmp_path / "zs")
    pred = cli("predict", *common, "--out", tmp_path / "pred")
    assert zero.returncode == pred.returncode == 1
    for res in (zero, pred):
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 2 and f"{images / 'broken.png'}:" in errors[0] and "1 of 4 image(s) failed" in errors[1]
    for path in list_images(images):
        if path.name == "broken.png":
            continue
        a, b = (read_mask(tmp_path / out / f"{path.stem}_mask.png") for out in ("zs", "pred"))
        assert np.array_equal(a, b) and a.shape == read_image(path).size
        record = json.loads((tmp_path / "pred" / f"{path.stem}.json").read_text())
        assert record["prompt_spec"]["mode"] == prompt and record["prompt_spec"]["seed"] == 4
    for out in ("zs", "pred"):
        results = pd.read_csv(tmp_path / out / "results.csv")
        assert list(results.status) == ["failed", "ok", "ok", "ok"]  # sorted by name: broken.png first
    after = {**folder_digest(images), **{f"d/{k}": v for k, v in folder_digest(drafts).items()}}
    assert after == before


def test_predict_output_feeds_zero_shot_drafts_and_finetune_validation(cli, tiny_backend, inputs, tmp_path):
    """`<stem>_mask.png` written by one command is read back as a draft by the next, by the same rule
    (pretrained LiteMedSAM, so the masks are real lungs)."""
    images, drafts = inputs
    (images / "broken.png").unlink()
    first = cli("predict", "--images", images, "--drafts", drafts, "--out", tmp_path / "round1")
    assert first.returncode == 0, first.stderr
    source = MaskFolderDrafts(tmp_path / "round1")  # overlays and results.csv are not taken for masks
    assert sorted(source.files) == sorted(p.stem for p in list_images(images))
    second = cli("zero-shot", "--images", images, "--drafts", tmp_path / "round1", "--out", tmp_path / "round2")
    assert second.returncode == 0, second.stderr
    from cxrsam.data.layouts import Case
    from cxrsam.train.finetune import _val_prompts, make_config

    cases = [Case(p.stem, p, [drafts / p.name], ["both"], "folder") for p in list_images(images)]
    config = make_config(data=tmp_path, backend="tiny_sam", checkpoint=tiny_backend, val_drafts=tmp_path / "round1")
    prompts = _val_prompts(config, cases, tiny_spec().transform)["main"]  # by validation kind (issue 18)
    assert len(prompts) == len(cases) and all(p.image_size == (64, 64) for p in prompts)


def test_outputs_never_go_into_an_input_folder_or_over_an_input(cli, tiny_backend, inputs, tmp_path, folder_digest):
    images, drafts = inputs
    before = folder_digest(tmp_path)
    common = ["--backend", "tiny_sam", "--checkpoint", tiny_backend]
    for out in (images, images / "sub", drafts, images / "broken.png"):
        res = cli("predict", "--images", images, "--drafts", drafts, *common, "--out", out)
        assert res.returncode == 1
        [line] = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert "--out" in line
    assert folder_digest(tmp_path) == before


def test_two_inputs_sharing_a_name_both_fail_and_the_rest_are_written(tiny_backend, inputs, tmp_path):
    images, drafts = inputs
    first = list_images(images)[1]  # [0] is broken.png
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copy(first, other / first.name)
    segmenter = Segmenter(build_sam("tiny_sam", tiny_backend), MaskFolderDrafts(drafts))
    paths = [*list_images(images), other / first.name]
    report = segment_images(segmenter, paths, tmp_path / "out", progress=False)
    failed = {path for path, _ in report.failed}
    assert {first, other / first.name, images / "broken.png"} == failed
    assert all("same name" in message for path, message in report.failed if path.name == first.name)
    assert len(report.written) == 2 and not (tmp_path / "out" / f"{first.stem}_mask.png").exists()


def test_cnn_only_segmenter_writes_the_draft_and_prompt_spec_validation(tiny_backend, inputs, tmp_path):
    images, drafts = inputs
    (images / "broken.png").unlink()
    report = segment_images(Segmenter(None, MaskFolderDrafts(drafts)), list_images(images), tmp_path / "out",
                            progress=False)
    for path in list_images(images):
        assert np.array_equal(read_mask(report.written[path]["mask"]), read_mask(drafts / path.name))
    with pytest.raises(CxrsamError, match="nothing to segment with"):
        Segmenter(None, None)
    with pytest.raises(ValueError):
        PromptSpec(mode="scribble")


def test_prefetched_pipeline_keeps_input_order_and_gives_the_masks_of_one_at_a_time(tiny_backend, inputs, tmp_path,
                                                                                   monkeypatch):
    images, drafts = inputs
    paths = list_images(images)
    for extra in range(5):  # more images than the prefetch depth, and a failure in the middle
        shutil.copy(paths[1 + extra % 3], images / f"z{extra}.png")
        shutil.copy(drafts / paths[1 + extra % 3].name, drafts / f"z{extra}.png")
    (images / "y_broken.png").write_bytes(b"not an image")
    paths = list_images(images)
    source = MaskFolderDrafts(drafts)
    drafted = []

    class RecordingDrafts(MaskFolderDrafts):
        def __call__(self, xray):
            drafted.append(xray.path)
            return super().__call__(xray)

    segmenter = Segmenter(build_sam("tiny_sam", tiny_backend), RecordingDrafts(drafts), uncertainty_samples=2)
    report = segment_images(segmenter, paths, tmp_path / "out", progress=False)
    readable = [p for p in paths if "broken" not in p.name]
    assert drafted == readable  # drafted ahead in input order, each once
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(results.image) == [str(p) for p in paths]
    assert [p for p, _ in report.failed] == [p for p in paths if "broken" in p.name]
    assert list(results.status) == ["failed" if "broken" in p.name else "ok" for p in paths]
    alone = Segmenter(build_sam("tiny_sam", tiny_backend), source, uncertainty_samples=2)
    for path in readable:
        expected = alone.segment(read_image(path))
        np.testing.assert_array_equal(read_mask(report.written[path]["mask"]), expected.mask)
        record = json.loads(report.written[path]["json"].read_text())
        assert record["uncertainty"]["max"] == pytest.approx(round(expected.uncertainty.score, 4))
