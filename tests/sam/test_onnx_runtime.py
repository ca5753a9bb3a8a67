"""ONNX Runtime for SAM on the tiny model: the same masks as PyTorch, exported once per model and checked,
refused when it disagrees, chosen by --runtime (also through the CLI with a LoRA run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxrsam.errors import CxrsamError
from cxrsam.prompts import Prompts, PromptSet, prompts_from_mask
from cxrsam.sam import lora, onnx_cache, onnx_export
from cxrsam.sam import onnx_runtime as ort_sam
from cxrsam.sam.engine import SamEngine
from cxrsam.sam.onnx_runtime import OnnxSamEngine, Runtime, make_engine, resolve_runtime
from cxrsam.sam.registry import BACKENDS, build_sam
from cxrsam.sam.testing import tiny_spec, write_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return build_sam(tiny_spec(), checkpoint=tiny_checkpoint)


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def engine(tiny, onnx_root):
    return OnnxSamEngine(tiny, onnx_root=onnx_root)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


@pytest.mark.parametrize("mode", ["box", "points", "box+points"])
@pytest.mark.parametrize("multimask", [False, True])
def test_onnx_engine_gives_the_masks_of_torch(tiny, engine, cases, mode, multimask):
    torch_engine = SamEngine(tiny)
    images = [image for image, _ in cases]
    prompts = [prompts_from_mask(mask, mode=mode, points_per_lung=3, negatives=("outside",)) for _, mask in cases]
    got = engine.segment_many(images, prompts, multimask=multimask)
    expected = torch_engine.segment_many(images, prompts, multimask=multimask)
    for image, prompt, mask, reference in zip(images, prompts, got, expected):
        assert mask.shape == image.shape and mask.dtype == bool
        assert 0 < reference.sum() < reference.size  # a real mask, not an empty or full one
        assert iou(mask, reference) >= 0.999
        onnx_logits = engine.decode_logits(engine.embed([image])[0], prompt, multimask)
        torch_logits = torch_engine.decode_logits(torch_engine.embed([image])[0], prompt, multimask)
        np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-3, rtol=1e-3)


def test_clicks_replayed_with_the_previous_result_as_mask_prompt_give_the_logits_of_torch(tiny, engine, cases):
    import dataclasses

    refining = dataclasses.replace(tiny, mask_prompt=True)  # same weights: the cached export serves it
    onnx_engine = OnnxSamEngine(refining, onnx_root=engine.onnx.folder.parent)
    torch_engine = SamEngine(refining)
    points, labels = np.array([[30.0, 40.0], [60.0, 20.0]], np.float32), np.array([1, 0])
    for image, mask in cases:
        prompts = prompts_from_mask(mask, mode="box")
        _, onnx_logits, _ = onnx_engine.decode_clicks(onnx_engine.embed([image])[0], prompts, points, labels)
        _, torch_logits, _ = torch_engine.decode_clicks(torch_engine.embed([image])[0], prompts, points, labels)
        np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-3, rtol=1e-3)
        _, plain, _ = SamEngine(tiny).decode_clicks(torch_engine.embed([image])[0], prompts, points, labels)
        assert np.abs(plain - torch_logits).max() > 1e-2  # the mask prompt reached the ONNX decoder


def test_batched_onnx_encoder_and_mixed_prompt_groups(tiny, engine, cases):
    images = [image for image, _ in cases]
    batched = OnnxSamEngine(tiny, batch_size=3, onnx_root=engine.onnx.folder.parent)
    embeddings = batched.embed(images)  # one encoder call with B = 3 (the graph's batch is dynamic)
    reference = SamEngine(tiny).embed(images)
    assert batched.images_encoded == 3 and batched.onnx.check["dynamic_batch"]
    for got, expected in zip(embeddings, reference):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    fixed = dict(batched.onnx.check, dynamic_batch=False)  # an encoder traced with its batch baked in (TinyViT)
    one_by_one = ort_sam.OnnxSam(batched.onnx.encoder, batched.onnx.decoder, batched.onnx.folder, fixed)
    x = tiny.spec.transform.images(images)
    np.testing.assert_allclose(one_by_one.encode(x), np.stack(reference), atol=1e-4, rtol=1e-4)
    image, mask = cases[1]
    base = prompts_from_mask(mask, mode="box+points", points_per_lung=2)
    mixed = Prompts([base.sets[0], PromptSet(box=base.sets[1].box)], base.image_size, "box+points", 2)
    np.testing.assert_allclose(engine.decode_logits(engine.embed([image])[0], mixed),
                               SamEngine(tiny).decode_logits(reference[1], mixed), atol=1e-3, rtol=1e-3)


def test_only_pytorch_on_the_cpu_keeps_freed_memory(tiny, engine, monkeypatch):
    from cxrsam.sam import engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append(1) or True)
    OnnxSamEngine(tiny, onnx_root=engine.onnx.folder.parent)
    assert calls == []  # ONNX Runtime keeps its own arena
    SamEngine(tiny)
    assert calls == [1]  # PyTorch's activations reuse the heap's pages (cxrsam.config.keep_freed_memory)


def test_embedding_cache_keys_name_the_runtime(tiny, engine, cases, tmp_path):
    pixels = cases[0][0]
    assert engine.cache_key(pixels) != SamEngine(tiny).cache_key(pixels)
    on_disk = OnnxSamEngine(tiny, cache_dir=tmp_path, onnx_root=engine.onnx.folder.parent)
    on_disk.embed([pixels])
    again = OnnxSamEngine(tiny, cache_dir=tmp_path, onnx_root=engine.onnx.folder.parent)
    again.embed([pixels])
    assert again.images_encoded == 0 and SamEngine(tiny, cache_dir=tmp_path).embed([pixels])
    assert len(list(tmp_path.glob("*.npz"))) == 2  # torch's embedding did not reuse onnx's


def test_export_is_cached_checked_and_keyed_by_checkpoint(tiny, engine, tmp_path, monkeypatch):
    folder = engine.onnx.folder
    check = json.loads((folder / "check.json").read_text())
    assert check["passed"] and check["min_mask_iou"] >= 0.999 and check["relative_embedding_diff"] <= 1e-3
    assert check["key"]["checkpoint_sha256"] == tiny.checkpoint_sha256 and check["masks_compared"] == 24
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "export_graphs", no_export)
    again = ort_sam.load_onnx_sam(tiny, root=folder.parent)  # a second build reuses the cache
    assert again.folder == folder and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    other = build_sam(tiny_spec(), checkpoint=write_tiny_checkpoint(tmp_path / "other.pth", seed=1))
    assert ort_sam.export_dir(other, root=folder.parent) != folder
    with pytest.raises(AssertionError, match="exported again"):  # another checkpoint: another export
        ort_sam.load_onnx_sam(other, root=folder.parent)


def test_a_cached_export_serves_a_lazily_loaded_model_without_building_it(tiny, engine, cases, adapted_run,
                                                                          tmp_path):
    lazy = build_sam(tiny_spec(), checkpoint=tiny.checkpoint_path, lazy=True)
    served = OnnxSamEngine(lazy, onnx_root=engine.onnx.folder.parent)
    image, mask = cases[0]
    prompts = prompts_from_mask(mask, mode="box+points", points_per_lung=2)
    got = served.segment(image, prompts)
    assert not lazy.built and served.prompt_mask_side == SamEngine(tiny).prompt_mask_side
    assert np.array_equal(got, engine.segment(image, prompts))
    run = lora.load_run(adapted_run, lazy=True)  # a LoRA run: exported once (building it), then served unbuilt
    OnnxSamEngine(run, onnx_root=tmp_path)
    assert run.built
    again = lora.load_run(adapted_run, lazy=True)
    OnnxSamEngine(again, onnx_root=tmp_path).segment(image, prompts)
    assert not again.built and again.model_id == run.model_id


def test_an_altered_cached_export_is_exported_again(tiny, tmp_path, cases):
    first = ort_sam.load_onnx_sam(tiny, root=tmp_path)
    encoder = first.folder / "encoder.onnx"
    data = bytearray(encoder.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights: the graph still loads, the SHA-256 differs
    encoder.write_bytes(bytes(data))
    again = ort_sam.load_onnx_sam(tiny, root=tmp_path)
    assert onnx_cache.sha256_file(encoder) == again.check["files"]["encoder.onnx"] == first.check["files"]["encoder.onnx"]
    x = tiny.spec.transform.images([cases[0][0]])
    np.testing.assert_allclose(again.encode(x), SamEngine(tiny)._encode(x), atol=1e-4, rtol=1e-4)


def test_a_disagreeing_export_is_refused_in_one_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "MIN_MASK_IOU", 1.01)  # no export can meet it
    with pytest.raises(CxrsamError) as refused:
        OnnxSamEngine(tiny, onnx_root=tmp_path)
    message = str(refused.value)
    assert "\n" not in message and "disagrees with PyTorch" in message and "--runtime torch" in message
    folder = ort_sam.export_dir(tiny, root=tmp_path)
    assert refused.value.path == folder / "check.json"
    check = json.loads((folder / "check.json").read_text())
    assert not check["passed"] and check["limits"]["min_mask_iou"] == 1.01
    assert not (folder / "encoder.onnx").exists() and not (folder / "decoder.onnx").exists()
    monkeypatch.setattr(onnx_export, "MIN_MASK_IOU", 0.999)  # a refused export is not reused: exported and checked again
    assert OnnxSamEngine(tiny, onnx_root=tmp_path).onnx.check["passed"]


def test_runtime_resolution(tiny, monkeypatch):
    assert ort_sam.onnx_installed()  # the test command installs the onnx extra
    assert resolve_runtime("auto", "cpu") is Runtime.ONNX
    assert resolve_runtime("auto", "cuda") is Runtime.TORCH
    assert resolve_runtime("torch", "cpu") is Runtime.TORCH
    with pytest.raises(CxrsamError, match="runs SAM on the CPU"):
        resolve_runtime("onnx", "cuda")
    with pytest.raises(CxrsamError, match="unknown runtime 'tensorrt'"):
        resolve_runtime("tensorrt", "cpu")
    assert type(make_engine(tiny, "torch")) is SamEngine
    monkeypatch.setattr(ort_sam, "onnx_installed", lambda: False)
    assert resolve_runtime("auto", "cpu") is Runtime.TORCH
    with pytest.raises(CxrsamError, match=r"pip install 'cxrsam\[onnx\]'"):
        resolve_runtime("onnx", "cpu")


@pytest.fixture
def adapted_run(tmp_path, monkeypatch, tiny_checkpoint):
    """A LoRA run on the tiny SAM (registered as ``tiny_sam``) whose adapters change the output."""
    monkeypatch.setitem(BACKENDS, "tiny_sam", tiny_spec("tiny_sam"))
    monkeypatch.setenv("CXRSAM_CACHE", str(tmp_path / "cache"))
    loaded = build_sam("tiny_sam", tiny_checkpoint)
    settings = lora.LoraSettings(rank=2)
    model = lora.apply_lora(loaded.model, settings)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    lora.save_adapter(tmp_path / "run", model, loaded, settings)
    return tmp_path / "run"


def test_predict_runtime_onnx_gives_the_masks_of_torch_with_a_lora_run(adapted_run, cli, phantoms, tmp_path):
    outputs = {}
    for runtime in ("torch", "onnx"):
        res = cli("predict", "--run", adapted_run, "--images", phantoms / "images", "--drafts", phantoms / "masks",
                  "--prompt", "box+points", "--device", "cpu", "--runtime", runtime, "--out", tmp_path / runtime)
        assert res.returncode == 0, res.stderr
        outputs[runtime] = tmp_path / runtime
    masks = sorted(outputs["torch"].glob("*_mask.png"))
    assert len(masks) == 12
    for path in masks:
        reference = np.asarray(Image.open(path)) > 0
        got = np.asarray(Image.open(outputs["onnx"] / path.name)) > 0
        assert 0 < reference.sum() < reference.size and iou(got, reference) >= 0.999, path.name
        record = json.loads((outputs["onnx"] / path.name.replace("_mask.png", ".json")).read_text())
        assert record["models"]["sam"]["runtime"] == "onnx" and record["models"]["sam"]["kind"] == "lora"
    exports = list((tmp_path / "cache" / "onnx").iterdir())
    assert len(exports) == 1 and json.loads((exports[0] / "check.json").read_text())["key"]["model_id"].startswith("lora:")


def test_export_onnx_writes_the_checked_graphs_of_the_merged_run(adapted_run, cli, tmp_path):
    res = cli("export", "--run", adapted_run, "--onnx", tmp_path / "exported")
    assert res.returncode == 0, res.stderr
    check = json.loads((tmp_path / "exported" / "check.json").read_text())
    assert check["passed"] and check["key"]["model_id"] == lora.load_run(adapted_run).model_id
    assert {p.name for p in (tmp_path / "exported").iterdir()} >= {"encoder.onnx", "decoder.onnx", "check.json"}


def test_experiment_sam_runtime_picks_the_engines(adapted_run, tiny_checkpoint, tmp_path):
    import yaml

    from cxrsam.experiment import load_config
    from cxrsam.experiment.runner import Experiment, _LazyLoraEngine

    (tmp_path / "default.yaml").write_text(yaml.safe_dump({"name": "default"}))
    assert load_config(tmp_path / "default.yaml").sam.runtime is Runtime.TORCH  # comparable with earlier runs
    (tmp_path / "onnx.yaml").write_text(yaml.safe_dump(
        {"device": "cpu", "sam": {"backend": "tiny_sam", "checkpoint": str(tiny_checkpoint), "runtime": "onnx"}}))
    config = load_config(tmp_path / "onnx.yaml")
    assert type(Experiment(config, tmp_path / "exp").engine()) is OnnxSamEngine
    assert type(_LazyLoraEngine(str(adapted_run), "cpu", None, config.sam.runtime)()) is OnnxSamEngine
    assert type(_LazyLoraEngine(str(adapted_run), "cpu", None)()) is SamEngine
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"sam": {"runtime": "tensorrt"}}))
    with pytest.raises(CxrsamError, match="sam.runtime"):
        load_config(tmp_path / "bad.yaml")


def test_sessions_keep_their_optimised_graph_for_this_cpu_and_remake_it_when_altered(tiny, tmp_path, cases):
    folder = ort_sam.load_onnx_sam(tiny, root=tmp_path).folder  # the export made and kept the optimised graphs
    key = onnx_cache.optimization_key()
    optimized, record = folder / f"encoder-{key}.onnx", folder / f"encoder-{key}.json"
    assert optimized.is_file() and json.loads(record.read_text())["source"] == onnx_cache.sha256_file(
        folder / "encoder.onnx")
    x = tiny.spec.transform.images([cases[0][0]])
    first = onnx_cache.inference_session(folder / "encoder.onnx").run(None, {"image": x})[0]  # from the kept graph
    stamp = optimized.stat().st_mtime_ns
    again = onnx_cache.inference_session(folder / "encoder.onnx").run(None, {"image": x})[0]
    assert optimized.stat().st_mtime_ns == stamp and np.array_equal(first, again)
    np.testing.assert_allclose(first, SamEngine(tiny)._encode(x), atol=1e-4, rtol=1e-4)
    optimized.write_bytes(b"not a graph")  # altered: made again from the source, not loaded
    remade = onnx_cache.inference_session(folder / "encoder.onnx").run(None, {"image": x})[0]
    assert np.array_equal(remade, first) and json.loads(record.read_text())["sha256"] == onnx_cache.sha256_file(
        optimized)
