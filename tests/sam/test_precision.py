"""Reduced precision of the SAM encoder on the tiny model: bf16 autocast and the ONNX int8 encoder give masks close
to fp32 (and float32 embeddings), int8 is quantised once and cached, the rules refuse impossible combinations in
one line, cache keys name the precision, and the stored measured cost is what a user is shown."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrsam import config as config_module
from cxrsam.errors import CxrsamError
from cxrsam.prompts import prompts_from_mask
from cxrsam.sam import engine as engine_module
from cxrsam.sam import onnx_cache, onnx_export
from cxrsam.sam import onnx_runtime as ort_sam
from cxrsam.sam.engine import Precision, SamEngine, check_torch_precision, precision_cost, precision_cost_key
from cxrsam.sam.onnx_runtime import OnnxSamEngine, Runtime, make_engine, resolve_runtime
from cxrsam.sam.registry import build_sam
from cxrsam.sam.testing import tiny_spec

BF16_CPU = torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return build_sam(tiny_spec(), checkpoint=tiny_checkpoint)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


def agreement(engine: SamEngine, reference: SamEngine, cases) -> list[float]:
    images = [image for image, _ in cases]
    prompts = [prompts_from_mask(mask, mode="box") for _, mask in cases]
    got, expected = engine.segment_many(images, prompts), reference.segment_many(images, prompts)
    assert all(0 < m.sum() < m.size for m in expected)  # real masks, not empty or full ones
    return [iou(a, b) for a, b in zip(got, expected)]


def test_int8_encoder_is_quantised_once_cached_and_close_to_fp32(tiny, cases, tmp_path, monkeypatch):
    int8 = OnnxSamEngine(tiny, onnx_root=tmp_path, precision="int8")
    folder = int8.onnx.folder
    record = json.loads((folder / onnx_cache.CHECK_INT8).read_text())
    assert record["weight_type"] == "QInt8" and 0 < record["relative_embedding_diff"] < 0.5
    assert (folder / onnx_cache.ENCODER_INT8).stat().st_size < (folder / onnx_cache.ENCODER).stat().st_size
    assert min(agreement(int8, SamEngine(tiny), cases)) >= 0.9
    fp32 = OnnxSamEngine(tiny, onnx_root=tmp_path)  # the same export folder keeps its float32 encoder
    assert fp32.onnx.encoder is not int8.onnx.encoder and int8.cache_key(cases[0][0]) != fp32.cache_key(cases[0][0])

    def refuse(*args, **kwargs):
        raise AssertionError("quantised again")

    monkeypatch.setattr(onnx_export, "quantize_encoder", refuse)
    OnnxSamEngine(tiny, onnx_root=tmp_path, precision="int8")  # from the cache
    # 7-bit weights (no u8 x s8 saturation) exactly where the CPU lacks VNNI/AMX
    assert record["reduce_range"] is not config_module.cpu_has_int8_dot_product()
    this_cpu = config_module.cpu_flags()
    other = frozenset({"avx2"}) if config_module.cpu_has_int8_dot_product() else frozenset({"avx2", "avx512_vnni"})
    monkeypatch.setattr(config_module, "cpu_flags", lambda: other)
    assert onnx_cache.int8_settings()["reduce_range"] is not record["reduce_range"]
    with pytest.raises(AssertionError, match="quantised again"):  # made for another kind of CPU: quantised again
        OnnxSamEngine(tiny, onnx_root=tmp_path, precision="int8")
    monkeypatch.setattr(config_module, "cpu_flags", lambda: this_cpu)
    (folder / onnx_cache.ENCODER_INT8).write_bytes(b"altered")
    with pytest.raises(AssertionError, match="quantised again"):
        OnnxSamEngine(tiny, onnx_root=tmp_path, precision="int8")


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no AVX512-BF16/AMX for bf16 autocast")
def test_bf16_autocast_gives_float32_embeddings_and_masks_close_to_fp32(tiny, cases):
    bf16, fp32 = SamEngine(tiny, precision="bf16"), SamEngine(tiny)
    image = cases[0][0]
    got, reference = bf16.embed([image])[0], fp32.embed([image])[0]
    assert got.dtype == torch.float32 and not torch.equal(got, reference)  # ran in bf16, returned as float32
    assert float((got - reference).abs().max() / reference.abs().max()) < 0.1
    assert min(agreement(bf16, fp32, cases)) >= 0.9
    assert bf16.cache_key(image) != fp32.cache_key(image)


def test_a_reduced_precision_is_checked_against_fp32_once_and_refused_when_it_overflows(tiny, cases, monkeypatch):
    import torch.nn as nn

    class Encoder(nn.Module):  # the tiny encoder, made to overflow like fp16 does whenever autocast is on
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner, self.calls, self.overflow = inner, 0, False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = self.inner(x)
            return out * float("inf") if self.overflow and torch.is_autocast_enabled("cpu") else out

    encoder = Encoder(tiny.model.image_encoder)
    monkeypatch.setattr(tiny.model, "image_encoder", encoder)
    monkeypatch.setattr(engine_module, "_cpu_runs_bf16", lambda: True)
    images = [image for image, _ in cases[:2]]
    engine = SamEngine(tiny, precision="bf16", memory_items=0, batch_size=1)
    assert engine.precision_check is None
    engine.embed(images)
    assert encoder.calls == 3  # the first batch twice (bf16, then fp32 for the check), the second once
    assert 0 <= engine.precision_check < 0.5
    assert SamEngine(tiny).embed(images[:1]) and SamEngine(tiny).precision_check is None  # fp32: nothing to check
    encoder.overflow = True
    with pytest.raises(CxrsamError, match="not finite in bf16"):
        SamEngine(tiny, precision="bf16").embed(images[:1])
    reference = np.ones((1, 2, 2, 2), np.float32)
    with pytest.raises(CxrsamError, match="values overflow float16.*use bf16 or fp32"):
        engine_module.check_reduced_embeddings(reference * float("nan"), reference, Precision.FP16)
    assert engine_module.check_reduced_embeddings(reference * 1.02, reference, Precision.FP16) == pytest.approx(0.02)


def test_precision_rules(tiny, monkeypatch):
    assert SamEngine(tiny).cache_key(np.zeros((8, 8), np.float32)) == \
        SamEngine(tiny, precision="fp32").cache_key(np.zeros((8, 8), np.float32))
    with pytest.raises(CxrsamError, match="int8 runs in ONNX Runtime"):
        SamEngine(tiny, precision="int8")
    with pytest.raises(CxrsamError, match="fp16 needs a GPU"):
        check_torch_precision("fp16", "cpu")
    with pytest.raises(CxrsamError, match="unknown precision 'fp8'"):
        check_torch_precision("fp8", "cpu")
    with pytest.raises(CxrsamError, match="unknown precision"):
        resolve_runtime("auto", "cpu", "half")
    with pytest.raises(CxrsamError, match="bf16 runs in PyTorch autocast"):
        resolve_runtime("onnx", "cpu", "bf16")
    with pytest.raises(CxrsamError, match="bf16 runs in PyTorch autocast"):
        make_engine(tiny, "onnx", precision="bf16")
    monkeypatch.setattr(ort_sam, "onnx_installed", lambda: True)
    assert resolve_runtime("auto", "cpu", "int8") is Runtime.ONNX
    assert resolve_runtime("auto", "cpu", "bf16") is Runtime.TORCH
    assert resolve_runtime("auto", "cuda", "fp16") is Runtime.TORCH
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(CxrsamError, match="needs AVX512-BF16 or AMX"):
        check_torch_precision("bf16", "cpu")


def test_precision_cost_prints_the_stored_measurement(tmp_path, monkeypatch):
    stored = tmp_path / "precision_costs.json"
    monkeypatch.setattr(engine_module, "PRECISION_COSTS", stored)
    monkeypatch.setattr(config_module, "cpu_flags", lambda: frozenset({"avx2"}))  # the "int8" key's kind of CPU
    assert precision_cost(Precision.FP32) is None
    assert "no stored measurement" in precision_cost("int8")
    stored.write_text(json.dumps({"int8": {
        "images": 40, "data": "test images", "dice_fp32": 0.95, "dice_change": -0.0021, "iou_mean": 0.991,
        "iou_min": 0.95, "encoder_speedup": 1.7, "machine": "2-core CPU", "command": "python bench/precision.py"}}))
    note = precision_cost("int8")
    assert "Dice -0.0021" in note and "min 0.9500" in note and "1.70x" in note and "bench/precision.py" in note
    assert "no stored measurement" in precision_cost("bf16")
    assert "no stored measurement against fp32 on a CUDA" in precision_cost("int8", "cuda")  # a CPU measurement


def test_int8_costs_are_kept_apart_for_cpus_with_and_without_vnni(tmp_path, monkeypatch):
    """ONNX Runtime's int8 kernels differ with and without VNNI, so a VNNI CPU never prints the AVX2 measurement."""
    stored = tmp_path / "precision_costs.json"
    monkeypatch.setattr(engine_module, "PRECISION_COSTS", stored)
    entry = {"images": 109, "data": "test images", "dice_fp32": 0.97, "iou_mean": 0.99, "iou_min": 0.97,
             "encoder_speedup": 3.0, "machine": "2-core CPU", "command": "python bench/precision.py"}
    stored.write_text(json.dumps({"int8": {**entry, "dice_change": -0.0008}}))
    for flags, key in ((frozenset({"avx2"}), "int8"), (frozenset({"avx2", "avx512f", "avx512_vnni"}), "int8:vnni"),
                       (frozenset({"avx2", "avx_vnni"}), "int8:vnni")):
        monkeypatch.setattr(config_module, "cpu_flags", lambda flags=flags: flags)
        assert precision_cost_key("int8") == key
        assert precision_cost_key("bf16") == "bf16" and precision_cost_key("int8", "cuda") == "cuda:int8"
    assert "no stored measurement against fp32 on a CPU with VNNI" in precision_cost("int8")
    stored.write_text(json.dumps({"int8": {**entry, "dice_change": -0.0008},
                                  "int8:vnni": {**entry, "dice_change": -0.0002}}))
    assert "Dice -0.0002" in precision_cost("int8")
    monkeypatch.setattr(config_module, "cpu_flags", lambda: frozenset({"avx2"}))
    assert "Dice -0.0008" in precision_cost("int8")


def test_a_gpu_precision_prints_the_gpu_measurement_not_the_cpu_one(tmp_path, monkeypatch):
    stored = tmp_path / "precision_costs.json"
    monkeypatch.setattr(engine_module, "PRECISION_COSTS", stored)
    row = {"images": 64, "data": "test images", "dice_fp32": 0.97, "iou_mean": 0.99, "iou_min": 0.98,
           "command": "python bench/precision.py"}
    stored.write_text(json.dumps({
        "bf16": {**row, "dice_change": -0.0001, "encoder_speedup": 1.97, "machine": "2-core CPU"},
        precision_cost_key("bf16", "cuda"): {**row, "dice_change": -0.0002, "encoder_speedup": 1.44,
                                              "machine": "NVIDIA H200"}}))
    assert precision_cost_key("bf16", "cuda:1") == "cuda:bf16" and precision_cost_key("bf16", "cpu") == "bf16"
    gpu, cpu = precision_cost("bf16", "cuda"), precision_cost("bf16", "cpu")
    assert "1.44x" in gpu and "NVIDIA H200" in gpu and "1.97x" not in gpu
    assert "1.97x" in cpu and "2-core CPU" in cpu
    assert "no stored measurement against fp32 on a CUDA" in precision_cost("fp16", "cuda")


def test_the_shipped_costs_cover_every_reduced_precision_where_it_runs(monkeypatch):
    shipped = json.loads(engine_module.PRECISION_COSTS.read_text(encoding="utf-8"))
    for flags in (frozenset({"avx2"}), frozenset({"avx2", "avx512_vnni"})):  # CPUs without and with VNNI
        monkeypatch.setattr(config_module, "cpu_flags", lambda flags=flags: flags)
        for precision, device in (("bf16", "cpu"), ("int8", "cpu"), ("bf16", "cuda"), ("fp16", "cuda")):
            row = shipped[precision_cost_key(precision, device)]
            assert -0.001 < row["dice_change"] < 0.001 and 0.9 < row["iou_min"] <= row["iou_mean"] <= 1, precision


def test_predict_defaults_to_onnx_on_the_cpu_records_the_precision_and_prints_its_cost(
        cli, phantoms, tiny_checkpoint, tmp_path, monkeypatch):
    from cxrsam.sam.registry import BACKENDS

    monkeypatch.setitem(BACKENDS, "tiny_sam", tiny_spec("tiny_sam"))
    monkeypatch.delenv("CXRSAM_RUNTIME", raising=False)
    monkeypatch.setenv("CXRSAM_CACHE", str(tmp_path / "cache"))
    image = sorted((phantoms / "images").iterdir())[0]
    common = ["--images", image, "--drafts", phantoms / "masks", "--backend", "tiny_sam", "--checkpoint",
              tiny_checkpoint]
    for precision, out in (("fp32", "a"), ("int8", "b")):
        done = cli("predict", *common, "--precision", precision, "--out", tmp_path / out)
        assert done.returncode == 0, done.stderr
        sam = json.loads((tmp_path / out / f"{image.stem}.json").read_text())["models"]["sam"]
        assert (sam["runtime"], sam["precision"]) == ("onnx", precision)
        assert ("precision:" in done.stderr) == (precision == "int8")
    assert "int8 vs fp32" in done.stderr or "no stored measurement" in done.stderr
    refused = cli("predict", *common, "--runtime", "torch", "--precision", "int8", "--out", tmp_path / "c")
    assert refused.returncode == 1 and "int8 runs in ONNX Runtime" in refused.stderr
