"""LoRA adapters in SAM: injection, what is frozen, run files, refusing another base, merging, ONNX."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cxrsam.errors import CxrsamError
from cxrsam.prompts import PromptSet
from cxrsam.runs import ADAPTER_FILE, ADAPTER_JSON
from cxrsam.sam import lora
from cxrsam.sam.engine import decode, prompt_batch
from cxrsam.sam.registry import BACKENDS, build_sam
from cxrsam.sam.testing import TINY_SIZE, tiny_spec, write_tiny_checkpoint


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """The tiny SAM registered as backend ``tiny_sam`` and loaded from a checkpoint file."""
    monkeypatch.setitem(BACKENDS, "tiny_sam", tiny_spec())
    return build_sam("tiny_sam", checkpoint=write_tiny_checkpoint(tmp_path / "tiny.pth", seed=0))


def randomize_adapters(model: nn.Module, seed: int = 0) -> None:
    """Give LoRA B (zero at init) random values so adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def box_logits(loaded, image: np.ndarray) -> torch.Tensor:
    """Low-res logits (1, 2, 1, h, w) of two fixed boxes on ``image`` (S, S)."""
    size = loaded.spec.img_size
    sets = [PromptSet(box=np.array([0.1, 0.1, 0.45, 0.9], np.float32) * size),
            PromptSet(box=np.array([0.55, 0.1, 0.9, 0.9], np.float32) * size)]
    with torch.no_grad():
        embeddings = loaded.model.image_encoder(torch.from_numpy(loaded.spec.transform.images([image])))
        return decode(loaded.model, embeddings, prompt_batch(loaded.spec, sets, (size, size)))[0]


def test_adapters_go_only_where_targeted_and_freeze_the_rest(tiny):
    model = lora.apply_lora(tiny.model, lora.LoraSettings(rank=4, targets=["qkv"], train_decoder=False))
    adapted = sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n})
    assert adapted == ["image_encoder.blocks.0.attn.qkv", "image_encoder.blocks.1.attn.qkv"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    summary = lora.trainable_summary(model)
    assert summary["trainable"] == summary["lora"] == 2 * (4 * 32 + 4 * 96)
    assert 0 < summary["share_percent"] < 5


def test_all_targets_and_open_decoder(tiny):
    settings = lora.LoraSettings(targets=["qkv", "proj", "mlp", "decoder_attn"], train_decoder=True)
    model = lora.apply_lora(tiny.model, settings)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_" in n}
    assert adapted == {"qkv", "proj", "lin1", "lin2", "q_proj", "k_proj", "v_proj", "out_proj"}
    assert not any("patch_embed" in n for n, _ in model.named_parameters() if ".lora_" in n)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("mask_decoder."))
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n.startswith(("image_encoder.", "prompt_encoder.")) and ".lora_" not in n)


def test_targets_matching_nothing_are_refused():
    with pytest.raises(CxrsamError, match="match no layer"):
        lora.apply_lora(nn.Sequential(nn.Linear(4, 4)), lora.LoraSettings())


def test_run_files_hold_only_trained_weights_and_reload_exactly(tiny, tmp_path):
    settings = lora.LoraSettings(rank=4)
    model = lora.apply_lora(tiny.model, settings)
    randomize_adapters(model)
    image = np.random.default_rng(0).random((TINY_SIZE, TINY_SIZE)).astype(np.float32)
    before = box_logits(tiny, image)
    run = tmp_path / "run"
    lora.save_adapter(run, model, tiny, settings)
    from safetensors.torch import load_file

    keys = set(load_file(str(run / ADAPTER_FILE)))
    assert keys and all(".lora_" in k or k.startswith("mask_decoder.") for k in keys)
    info = json.loads((run / ADAPTER_JSON).read_text())
    assert info["base_sha256"] == tiny.checkpoint_sha256 and info["trainable"]["lora"] > 0
    loaded = lora.load_run(run)
    assert loaded.model_id.startswith("lora:") and loaded.model_id != tiny.model_id
    assert torch.equal(box_logits(loaded, image), before)
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_load_run_refuses_a_base_with_another_hash(tiny, tmp_path):
    settings = lora.LoraSettings(rank=2, train_decoder=False)
    lora.save_adapter(tmp_path / "run", lora.apply_lora(tiny.model, settings), tiny, settings)
    other = write_tiny_checkpoint(tmp_path / "other.pth", seed=1)
    with pytest.raises(CxrsamError, match="SHA-256 .* differs") as info:
        lora.load_run(tmp_path / "run", checkpoint=other)
    assert "\n" not in str(info.value) and str(other.resolve()) in str(info.value)
    with pytest.raises(CxrsamError, match="not a finished LoRA run"):
        lora.load_run(tmp_path)


def test_merged_export_equals_adapted_model_and_loads_without_peft(tiny, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    settings = lora.LoraSettings(rank=4, targets=["qkv", "proj", "mlp", "decoder_attn"], train_decoder=False)
    model = lora.apply_lora(tiny.model, settings)
    randomize_adapters(model)
    lora.save_adapter(tmp_path / "run", model, tiny, settings)
    image = np.random.default_rng(1).random((TINY_SIZE, TINY_SIZE)).astype(np.float32)
    adapted = box_logits(lora.load_run(tmp_path / "run"), image)
    base = box_logits(build_sam("tiny_sam", checkpoint=tiny.checkpoint_path), image)
    merged_file = lora.export_merged(tmp_path / "run", tmp_path / "merged.pth")
    merged = build_sam("tiny_sam", checkpoint=merged_file)
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.model.modules())
    merged_logits = box_logits(merged, image)
    assert (merged_logits - adapted).abs().max() < 1e-4
    assert (adapted - base).abs().max() > 1e-3  # the adapters matter, so the comparison means something


def test_litemedsam_adapters_skip_conv_stage_keep_bn_and_attention_cache(tmp_path):
    """On the real TinyViT: adapters only in attention stages; at init (B = 0) outputs are unchanged in
    eval and train mode (the cached attention bias ``ab`` follows the mode); merging round-trips."""
    base = build_sam("litemedsam")
    image = np.random.default_rng(2).random((256, 256)).astype(np.float32)
    x = torch.from_numpy(base.spec.transform.images([image]))
    with torch.no_grad():
        reference = base.model.image_encoder(x)
    model = lora.apply_lora(base.model, lora.LoraSettings())
    adapted = sorted({n.split(".lora_")[0] for n, _ in model.named_parameters() if ".lora_" in n})
    assert len(adapted) == 10 and not any(n.startswith("image_encoder.layers.0.") for n in adapted)
    with torch.no_grad():
        assert torch.equal(model.image_encoder(x), reference)
        from cxrsam.train.finetune import SamTrainee

        trainee = SamTrainee(base).train()
        assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        assert (model.image_encoder(x) - reference).abs().max() < 1e-4
        trainee.eval()
    randomize_adapters(model)
    lora.save_adapter(tmp_path / "run", model, base, lora.LoraSettings())
    adapted_logits = box_logits(lora.load_run(tmp_path / "run"), image)
    merged = build_sam("litemedsam", checkpoint=lora.export_merged(tmp_path / "run", tmp_path / "merged.pth"))
    assert (box_logits(merged, image) - adapted_logits).abs().max() < 1e-4


def test_onnx_export_matches_the_adapted_model(tiny, tmp_path):
    import onnxruntime as ort

    from cxrsam.sam.onnx_export import export_onnx
    from cxrsam.sam.onnx_runtime import decoder_inputs

    settings = lora.LoraSettings(rank=4)
    model = lora.apply_lora(tiny.model, settings)
    randomize_adapters(model)
    lora.save_adapter(tmp_path / "run", model, tiny, settings)
    folder = export_onnx(tmp_path / "run", tmp_path / "onnx")
    image = np.random.default_rng(3).random((TINY_SIZE, TINY_SIZE)).astype(np.float32)
    loaded = lora.load_run(tmp_path / "run")  # peft layers, not merged
    expected = box_logits(loaded, image)[0].numpy()
    x = loaded.spec.transform.images([image])
    embedding = ort.InferenceSession(str(folder / "encoder.onnx")).run(None, {"image": x})[0]
    size = loaded.spec.img_size
    sets = [PromptSet(box=np.array([0.1, 0.1, 0.45, 0.9], np.float32) * size),
            PromptSet(box=np.array([0.55, 0.1, 0.9, 0.9], np.float32) * size)]
    prompts = decoder_inputs(prompt_batch(loaded.spec, sets, (size, size)), 32)
    got = ort.InferenceSession(str(folder / "decoder.onnx")).run(None, {"embedding": embedding, **prompts})[0][:, :1]
    assert got.shape == expected.shape == (2, 1, 32, 32)
    assert np.abs(got - expected).max() < 1e-4


def _trained_run(tiny, run, seed: int = 0):
    """A run with random adapters and a changed (opened) mask decoder: every trained weight moved."""
    settings = lora.LoraSettings(rank=4, targets=["qkv", "decoder_attn"], train_decoder=True)
    model = lora.apply_lora(tiny.model, settings)
    randomize_adapters(model, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("mask_decoder.") and ".lora_" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    lora.save_adapter(run, model, tiny, settings)
    return settings


def test_lora_scale_zero_is_the_base_one_the_run_and_between_interpolates(tiny, tmp_path):
    """WiSE-FT: alpha 0 is bit-identical to the pretrained model, 1 to the fine-tuned run; opened weights lerp."""
    base_loaded = build_sam("tiny_sam", checkpoint=tiny.checkpoint_path)
    base_state = {k: v.clone() for k, v in base_loaded.model.state_dict().items()}
    _trained_run(tiny, tmp_path / "run")
    image = np.random.default_rng(4).random((TINY_SIZE, TINY_SIZE)).astype(np.float32)
    base = box_logits(base_loaded, image)
    full = lora.load_run(tmp_path / "run")
    assert full.scale == 1 and "@" not in full.model_id
    tuned = box_logits(full, image)
    assert (tuned - base).abs().max() > 1e-3  # the run differs from its base, so the checks below mean something
    assert torch.equal(box_logits(lora.load_run(tmp_path / "run", scale=1.0), image), tuned)
    zero = lora.load_run(tmp_path / "run", scale=0)
    assert torch.equal(box_logits(zero, image), base)
    zero_state = {k.replace(".base_layer", ""): v for k, v in zero.model.state_dict().items() if ".lora_" not in k}
    assert zero_state.keys() == base_state.keys()
    assert all(torch.equal(zero_state[k], base_state[k]) for k in base_state)
    half = lora.load_run(tmp_path / "run", scale=0.5)
    assert half.model_id.endswith("@0.5") and len({full.model_id, half.model_id, zero.model_id}) == 3
    name = "mask_decoder.iou_prediction_head.layers.0.weight"
    tuned_weight = full.model.state_dict()[name]
    assert torch.allclose(half.model.state_dict()[name], (base_state[name] + tuned_weight) / 2, atol=1e-7)
    middle = box_logits(half, image)
    assert 0 < (middle - base).abs().max() and 0 < (middle - tuned).abs().max()


def test_lora_scale_is_recorded_with_the_run_and_merged_into_exports(tiny, tmp_path):
    _trained_run(tiny, tmp_path / "run", seed=2)
    image = np.random.default_rng(5).random((TINY_SIZE, TINY_SIZE)).astype(np.float32)
    assert json.loads((tmp_path / "run" / ADAPTER_JSON).read_text())["lora_scale"] == 1.0
    at_03 = box_logits(lora.load_run(tmp_path / "run", scale=0.3), image)
    lora.record_lora_scale(tmp_path / "run", 0.3, {"chosen_on": "validation"})
    info = lora.read_adapter_info(tmp_path / "run")
    assert info.lora_scale == 0.3 and info.lora_scale_choice == {"chosen_on": "validation"}
    recorded = lora.load_run(tmp_path / "run")
    assert recorded.scale == 0.3 and torch.equal(box_logits(recorded, image), at_03)
    assert torch.equal(box_logits(lora.load_run(tmp_path / "run", scale=1), image),
                       box_logits(lora.load_run(tmp_path / "run", scale=1.0), image))
    merged = build_sam("tiny_sam", checkpoint=lora.export_merged(tmp_path / "run", tmp_path / "m.pth"))
    assert (box_logits(merged, image) - at_03).abs().max() < 1e-4
    merged_1 = build_sam("tiny_sam", checkpoint=lora.export_merged(tmp_path / "run", tmp_path / "m1.pth", scale=1))
    assert (box_logits(merged_1, image) - at_03).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [-0.1, 1.5, float("nan")])
def test_a_lora_scale_outside_zero_one_is_refused_in_one_line(tiny, tmp_path, scale):
    _trained_run(tiny, tmp_path / "run")
    with pytest.raises(CxrsamError, match=r"--lora-scale must be in \[0, 1\]") as info:
        lora.load_run(tmp_path / "run", scale=scale)
    assert "\n" not in str(info.value)
    with pytest.raises(CxrsamError, match=r"--lora-scale must be in \[0, 1\]"):
        lora.record_lora_scale(tmp_path / "run", scale)
