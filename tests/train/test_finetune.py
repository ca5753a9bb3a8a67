"""LoRA fine-tuning on phantoms with a tiny SAM: what trains, run files, resume, CLI."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cxrsam.errors import CxrsamError
from cxrsam.runs import load_checkpoint
from cxrsam.sam import lora
from cxrsam.sam.registry import BACKENDS, build_sam
from cxrsam.sam.testing import TINY_SIZE, tiny_spec, write_tiny_checkpoint
from cxrsam.train import finetune as ft


@pytest.fixture
def tiny_ckpt(tmp_path, monkeypatch):
    """Checkpoint of the tiny SAM, registered as backend ``tiny_sam``."""
    monkeypatch.setitem(BACKENDS, "tiny_sam", tiny_spec())
    return write_tiny_checkpoint(tmp_path / "tiny.pth", seed=0)


def tiny_config(data, checkpoint, **overrides) -> ft.FinetuneConfig:
    options = dict(data=data, backend="tiny_sam", checkpoint=checkpoint, split=(0.75, 0.25, 0.0), epochs=2,
                   batch_size=3, lr=3e-3, patience=None, progress=False, rank=4)
    return ft.make_config(**{**options, **overrides})


def prompted_data(phantoms, seed: int = 0, prompt: str = "mixed") -> ft.PromptedDataset:
    from cxrsam.data.layouts import discover
    from cxrsam.sam.testing import tiny_spec

    cases = discover(phantoms).cases[:4]
    return ft.PromptedDataset(cases, tiny_spec().transform, prompt, jitter=0.05, augment=True, seed=seed)


def test_training_steps_change_adapters_and_decoder_but_never_the_frozen_base(phantoms, tiny_ckpt):
    torch.manual_seed(0)
    loaded = build_sam("tiny_sam", checkpoint=tiny_ckpt)
    model = lora.apply_lora(loaded.model, lora.LoraSettings(rank=4, train_decoder=True))
    frozen = {n: t.clone() for n, t in model.state_dict().items()
              if ".lora_" not in n and not n.startswith("mask_decoder.")}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainee = ft.SamTrainee(loaded)
    batch = ft.collate_prompted([prompted_data(phantoms)[i] for i in range(4)])
    with torch.no_grad():
        before = ft.union_logits(trainee.eval()(batch[0], batch[3]), TINY_SIZE)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    trainee.train()
    for _ in range(3):
        loss = ft.segmentation_loss(trainee(batch[0], batch[3]), batch[4], iou_weight=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, tensor in model.state_dict().items():
        if name in frozen:
            assert torch.equal(tensor, frozen[name]), name
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trained[n])}
    assert any(".lora_A." in n for n in changed) and any(".lora_B." in n for n in changed)
    assert any(n.startswith("mask_decoder.") for n in changed)
    with torch.no_grad():
        after = ft.union_logits(trainee.eval()(batch[0], batch[3]), TINY_SIZE)
    assert (after - before).abs().max() > 1e-3


def test_prompts_and_targets_are_per_lung_and_reproducible(phantoms):
    data = prompted_data(phantoms)
    image, mask, index, prompts, targets, _ = data[1]
    assert image.shape == (3, TINY_SIZE, TINY_SIZE) and mask.shape == (1, TINY_SIZE, TINY_SIZE)
    assert len(prompts.sets) == len(targets) == 2
    assert torch.equal(targets.amax(dim=0) > 0, mask[0] > 0)  # the two lungs are the whole mask
    again = prompted_data(phantoms)[1][3]
    for a, b in zip(prompts.sets, again.sets):
        assert a.signature == b.signature
        assert all(np.array_equal(x, y) for x, y in ((a.box, b.box), (a.points, b.points)) if x is not None)
    changed = []
    for epoch in (1, 2, 3):
        data.set_epoch(epoch)
        changed.append(repr(data[1][3].sets) != repr(prompts.sets))
    assert any(changed)  # new jitter / points / prompt kind each epoch


def test_adapter_only_run_is_small_and_loads(phantoms, tiny_ckpt, tmp_path):
    run = ft.finetune(tiny_config(phantoms, tiny_ckpt, train_decoder=False), tmp_path / "run")
    names = {p.name for p in run.iterdir()}
    # a finished run holds its weights once: the adapters (no best.pt copy, no resume state)
    assert names == {"config.yaml", "manifest.csv", "metrics.csv", "curves.png", "adapter.safetensors",
                     "adapter.json", "checksums.json"}
    assert (run / "adapter.safetensors").stat().st_size < tiny_ckpt.stat().st_size / 4
    from safetensors.torch import load_file

    assert set(load_file(str(run / "adapter.safetensors"))) == set(lora.adapter_state(
        lora.apply_lora(build_sam("tiny_sam", checkpoint=tiny_ckpt).model, ft.read_config(run).lora)))
    info = lora.read_adapter_info(run)
    assert info.trainable["opened"] == 0 and info.trainable["trainable"] == info.trainable["lora"] > 0
    assert yaml.safe_load((run / "config.yaml").read_text())["lora"]["train_decoder"] is False
    epochs = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2"]  # epoch 0: the untouched SAM, validated before training (default)
    assert lora.load_run(run).model_id.startswith("lora:")


def test_killed_and_resumed_run_equals_uninterrupted(phantoms, tiny_ckpt, tmp_path):
    config = tiny_config(phantoms, tiny_ckpt, epochs=2, max_train_cases=6, max_val_cases=2, keep_resume_state=True)
    straight = ft.finetune(config, tmp_path / "straight")

    def kill_after_first(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ft.finetune(config, tmp_path / "resumed", on_epoch_end=kill_after_first)
    assert not (tmp_path / "resumed" / "adapter.safetensors").exists()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    ft.finetune(config, tmp_path / "resumed", resume=True)
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "adapter.safetensors")) for d in (straight, tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a, last_b = (load_checkpoint(d / "last.pt")["model"] for d in (straight, tmp_path / "resumed"))
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


def test_resume_refusals(phantoms, tiny_ckpt, tmp_path):
    config = tiny_config(phantoms, tiny_ckpt, epochs=1, max_train_cases=3, max_val_cases=1)
    with pytest.raises(CxrsamError, match="nothing to resume"):
        ft.finetune(config, tmp_path / "run", resume=True)
    ft.finetune(config, tmp_path / "run")
    with pytest.raises(CxrsamError, match="already holds a training run"):
        ft.finetune(config, tmp_path / "run")
    with pytest.raises(CxrsamError, match=r"nothing to resume \(the run has finished\)"):
        ft.finetune(config, tmp_path / "run", resume=True)

    def kill(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ft.finetune(config, tmp_path / "unfinished", on_epoch_end=kill)
    with pytest.raises(CxrsamError, match="changed settings: lora"):
        ft.finetune(tiny_config(phantoms, tiny_ckpt, epochs=1, max_train_cases=3, max_val_cases=1, rank=2),
                    tmp_path / "unfinished", resume=True)


def test_cli_finetune_export_and_errors(phantoms, tiny_ckpt, tmp_path, folder_digest):
    from cxrsam.cli import app

    data_before = folder_digest(phantoms)
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["finetune", "--data", str(phantoms), "--backend", "tiny_sam", "--checkpoint",
                                 str(tiny_ckpt), "--rank", "2", "--target", "qkv", "--target", "proj",
                                 "--freeze-decoder", "--no-augment", "--epochs", "1", "--max-train-cases", "3", "--max-val-cases",
                                 "2", "--batch-size", "3", "--set", "loop.keep_resume_state=true", "--out", str(run)])
    assert result.exit_code == 0, result.output
    settings = ft.read_config(run).lora
    assert settings.rank == 2 and settings.targets == ["qkv", "proj"] and not settings.train_decoder
    assert not ft.read_config(run).augment
    # --resume alone takes every setting (LoRA and loop sections included) from the run's config.yaml
    result = runner.invoke(app, ["finetune", "--resume", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert ft.read_config(run).lora == settings
    result = runner.invoke(app, ["finetune", "--resume", "--rank", "4", "--out", str(run)])
    assert isinstance(result.exception, CxrsamError) and "changed settings: lora" in str(result.exception)
    result = runner.invoke(app, ["export", "--run", str(run), "--merged", str(tmp_path / "merged.pth")])
    assert result.exit_code == 0, result.output
    assert build_sam("tiny_sam", checkpoint=tmp_path / "merged.pth").checkpoint_sha256 != \
        build_sam("tiny_sam", checkpoint=tiny_ckpt).checkpoint_sha256
    result = runner.invoke(app, ["predict", "--run", str(run), "--images", str(phantoms / "images"), "--drafts",
                                 str(phantoms / "masks"), "--prompt", "box", "--out", str(tmp_path / "pred"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "pred").glob("*_mask.png"))) == 12
    result = runner.invoke(app, ["export", "--run", str(run)])
    assert isinstance(result.exception, CxrsamError) and "nothing to export" in str(result.exception)
    result = runner.invoke(app, ["finetune", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, CxrsamError) and "--data is required" in str(result.exception)
    (tmp_path / "taken").write_text("notes")
    for command in (["finetune", "--backend", "tiny_sam", "--checkpoint", str(tiny_ckpt)], ["train-cnn", "--arch", "unet"]):
        result = runner.invoke(app, [*command, "--data", str(phantoms), "--out", str(tmp_path / "taken")])
        assert isinstance(result.exception, CxrsamError) and "exists and is not a folder" in str(result.exception)
    assert (tmp_path / "taken").read_text() == "notes"
    assert folder_digest(phantoms) == data_before  # training, predicting and exporting left the data as it was
    # settings as data: a run's config.yaml is a valid --config; --set and options override it, in that order
    result = runner.invoke(app, ["finetune", "--config", str(run / "config.yaml"), "--set", "lora.rank=3",
                                 "--set", "loop.epochs=1", "--max-val-cases", "1", "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output
    again = ft.read_config(tmp_path / "again")
    assert again.lora.rank == 3 and again.max_val_cases == 1 and again.lora.targets == ["qkv", "proj"]
    assert (tmp_path / "again" / "last.pt").exists()  # loop.keep_resume_state: true came from the file
    for bad, problem in ((["--set", "lora.rank"], "not KEY=VALUE"), (["--set", "lora.rank=0"], "lora.rank")):
        result = runner.invoke(app, ["finetune", "--config", str(run / "config.yaml"), *bad, "--out",
                                     str(tmp_path / "bad")])
        assert isinstance(result.exception, CxrsamError) and problem in str(result.exception)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_the_blocks(phantoms, tiny_ckpt):
    """With LoRA in the encoder blocks (frozen base, no gradient on the input: where reentrant checkpointing would
    give the adapters no gradient), checkpointing keeps loss and gradients, keeps fewer tensors for the backward pass
    and runs every block's attention again in the backward pass. Box prompts, so that the decoder's saved tensors
    (which checkpointing leaves alone) stay small beside the encoder's."""
    batch = ft.collate_prompted([prompted_data(phantoms, prompt="box")[i] for i in range(2)])

    def step(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int, int]:
        """Loss, LoRA gradients, bytes kept for the backward pass, attention calls of one training step."""
        loaded = build_sam("tiny_sam", checkpoint=tiny_ckpt)
        model = lora.apply_lora(loaded.model, lora.LoraSettings(rank=2))
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if ".lora_" in name:
                torch.nn.init.normal_(param, std=0.1)
        if checkpointing:
            assert ft.enable_gradient_checkpointing(model.image_encoder) == 2
        calls, kept = [], []
        for block in model.image_encoder.blocks:
            block.attn.register_forward_hook(lambda *_: calls.append(1))

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            kept.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = ft.segmentation_loss(ft.SamTrainee(loaded).train()(batch[0], batch[3]), batch[4])
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if ".lora_" in n}, sum(kept), \
            len(calls)

    (loss, grads, kept, calls), (loss_ck, grads_ck, kept_ck, calls_ck) = step(False), step(True)
    assert loss == pytest.approx(loss_ck, abs=1e-6)
    assert grads.keys() == grads_ck.keys() and all(g.abs().sum() > 0 for g in grads_ck.values())
    assert all(torch.allclose(grads[n], grads_ck[n], atol=1e-6) for n in grads)
    assert kept_ck < 0.8 * kept  # the blocks' activations are not kept but recomputed
    assert (calls, calls_ck) == (2, 4)


def test_gradient_checkpointing_reaches_every_stage_of_litemedsams_encoder():
    """TinyViT (LiteMedSAM): the convolutional stage and the three attention stages, 2 + 2 + 6 + 2 blocks; its own
    ``use_checkpoint`` (reentrant) stays off."""
    from cxrsam.sam.registry import _medsam_lite

    encoder = _medsam_lite().modeling.build_lite_medsam().image_encoder
    assert ft.enable_gradient_checkpointing(encoder) == 12
    assert all(hasattr(block.forward, "__wrapped__") for layer in encoder.layers for block in layer.blocks)
    assert not any(layer.use_checkpoint for layer in encoder.layers)


def test_a_non_square_image_reaches_the_model_as_the_same_tensor_in_finetuning_and_inference(tmp_path, tiny_ckpt):
    """Fine-tuning letterboxes like inference (no stretching): the encoder input of a 90 x 140 image is
    bit-identical in the training dataset and in the engine, and so is the lung mask's frame."""
    from PIL import Image

    from cxrsam.data.io import read_image
    from cxrsam.data.layouts import discover
    from cxrsam.sam.engine import SamEngine

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = (rng.random((90, 140)) * 255).astype(np.uint8)
    mask = np.zeros((90, 140), np.uint8)
    mask[20:70, 15:60] = mask[20:70, 80:125] = 255
    Image.fromarray(image).save(tmp_path / "images" / "wide.png")
    Image.fromarray(mask).save(tmp_path / "masks" / "wide.png")
    loaded = build_sam("tiny_sam", checkpoint=tiny_ckpt)
    transform = loaded.spec.transform
    data = ft.PromptedDataset(discover(tmp_path).cases, transform, "box")
    model_input, truth, _, prompts, _, _ = data[0]

    seen = []
    loaded.model.image_encoder.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    SamEngine(loaded).embed([read_image(tmp_path / "images" / "wide.png")])
    assert seen[0].shape == (1, 3, TINY_SIZE, TINY_SIZE)
    assert torch.equal(model_input, seen[0][0])
    h, w = transform.resized_shape((90, 140))
    assert (h, w) == (41, TINY_SIZE)  # aspect ratio kept, not stretched to 64 x 64
    assert model_input[:, h:].abs().sum() == 0  # zero padding below the image
    target = truth[0].numpy() > 0.5
    assert not target[h:].any() and np.array_equal(target, transform.mask(mask > 0))
    expected = transform.boxes(np.array([[15, 20, 59, 69], [80, 20, 124, 69]], np.float32), (90, 140))
    got = np.stack([s.box for s in prompts.sets])
    assert np.abs(got - expected).max() <= 1.0  # prompts from the letterboxed mask sit where inference puts them


def test_shift_augmentation_and_cnn_like_boxes_are_seeded_and_keep_targets_on_the_image(phantoms):
    from cxrsam.data.layouts import discover
    from cxrsam.prompts import prompts_from_mask

    cases = discover(phantoms).cases[:4]
    transform = tiny_spec().transform
    data = ft.PromptedDataset(cases, transform, "box", shift=1.0, box_error=3.0, seed=2)
    plain = ft.PromptedDataset(cases, transform, "box", seed=2)
    shifted_any = moved_any = False
    for i in range(4):
        image, mask, _, prompts, targets, _ = data[i]
        again = data[i]
        assert torch.equal(image, again[0]) and [s.signature for s in prompts.sets] == [
            s.signature for s in again[3].sets]
        assert all(np.array_equal(a.box, b.box) for a, b in zip(prompts.sets, again[3].sets))
        assert image.shape == (3, TINY_SIZE, TINY_SIZE) and torch.equal(targets.amax(0) > 0, mask[0] > 0)
        shifted_any |= not torch.equal(image, plain[i][0])
        oracle = prompts_from_mask(mask[0].numpy() > 0)
        moved_any |= any(not np.array_equal(a.box, b.box) for a, b in zip(prompts.sets, oracle.sets))
        for s in prompts.sets:
            assert 0 <= s.box[0] < s.box[2] <= TINY_SIZE - 1 and 0 <= s.box[1] < s.box[3] <= TINY_SIZE - 1
    assert shifted_any and moved_any
    first = [data[i][0] for i in range(4)]
    data.set_epoch(1)
    assert any(not torch.equal(data[i][0], first[i]) for i in range(4))  # a new shift each epoch


def test_consistency_term_is_zero_for_the_base_and_pulls_adapters_back(phantoms, tiny_ckpt):
    loaded = build_sam("tiny_sam", checkpoint=tiny_ckpt)
    model = lora.apply_lora(loaded.model, lora.LoraSettings(rank=4, train_decoder=False))
    trainee = ft.SamTrainee(loaded).eval()
    batch = ft.collate_prompted([prompted_data(phantoms)[i] for i in range(2)])
    images, prompts = batch[0], batch[3]
    with torch.no_grad():
        assert ft.consistency_loss(trainee, images, prompts, trainee(images, prompts)).item() == 0.0  # B = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.add_(0.1)
        adapted = trainee(images, prompts)
        with ft.adapters_off(model):
            base = trainee(images, prompts)
        assert torch.equal(trainee(images, prompts)[0][0], adapted[0][0])  # switched back on after the block
    assert (adapted[0][0] - base[0][0]).abs().max() > 1e-3
    outputs = trainee(images, prompts)
    loss = ft.consistency_loss(trainee, images, prompts, outputs)
    expected = torch.nn.functional.mse_loss(torch.cat([o[0] for o in adapted]).sigmoid(),
                                            torch.cat([b[0] for b in base]).sigmoid())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    step = ft.finetune_step(consistency_weight=2.0)(trainee, batch)
    assert step.item() > ft.segmentation_loss(trainee(images, prompts), batch[4]).item()


def test_mixed_prompt_run_validates_each_kind_and_keeps_the_declared_combination(phantoms, tiny_ckpt, tmp_path):
    """Issue 18: per-kind validation columns, val_dice = the select_weights mean, the prompt encoder opened."""
    config = tiny_config(phantoms, tiny_ckpt, epochs=1, max_train_cases=3, max_val_cases=2, train_prompt_encoder=True,
                         train_mix={"weights": {"points": 1.0, "box+points": 1.0}, "max_points": 12},
                         val_points=9, select_weights={"main": 1.0, "points": 3.0})
    assert config.val_kinds()["points"].strategy == "probability" and config.val_kinds()["points"].points == 9
    run = ft.finetune(config, tmp_path / "run")
    import pandas as pd

    metrics = pd.read_csv(run / "metrics.csv")
    assert {"val_dice_main", "val_dice_points"} <= set(metrics.columns)
    expected = (metrics.val_dice_main + 3 * metrics.val_dice_points) / 4
    assert np.allclose(metrics.val_dice, expected, atol=1e-5)
    from safetensors.torch import load_file

    saved = load_file(str(run / "adapter.safetensors"))
    assert any(k.startswith("prompt_encoder.point_embeddings") for k in saved)
    assert not any(k.startswith("prompt_encoder.mask_downscaling") for k in saved)
    assert lora.read_adapter_info(run).lora.train_prompt_encoder
    with pytest.raises(CxrsamError, match="unknown validation kinds"):
        tiny_config(phantoms, tiny_ckpt, select_weights={"points": 1.0})
    with pytest.raises(CxrsamError, match="positive sum"):
        tiny_config(phantoms, tiny_ckpt, select_weights={"main": 0.0})


def test_a_run_trained_with_its_previous_result_is_served_with_click_rounds(phantoms, tiny_ckpt, tmp_path):
    mix = {"weights": {"box": 1.0}, "interactive": 1.0, "click_rounds": 2}
    config = tiny_config(phantoms, tiny_ckpt, epochs=1, max_train_cases=3, max_val_cases=2, train_mask_prompt=True,
                         train_mix={**mix, "previous_mask": True})
    run = ft.finetune(config, tmp_path / "run")
    from safetensors.torch import load_file

    assert any(k.startswith(lora.MASK_PROMPT_LAYERS) for k in load_file(str(run / "adapter.safetensors")))
    assert lora.read_adapter_info(run).mask_prompt and lora.load_run(run).mask_prompt
    plain = ft.finetune(tiny_config(phantoms, tiny_ckpt, epochs=1, max_train_cases=3, max_val_cases=2, train_mix=mix),
                        tmp_path / "plain")  # clicks on the model's errors, no mask prompt: served as before
    assert not lora.read_adapter_info(plain).mask_prompt and not lora.load_run(plain).mask_prompt
    from cxrsam.pipeline.segmenter import describe_models

    assert describe_models(lora.load_run(run), run=run)["sam"]["mask_prompt"] is True  # the JSON record says so
    assert "mask_prompt" not in describe_models(lora.load_run(plain), run=plain)["sam"]


def test_sets_with_different_point_counts_decode_in_their_own_order(phantoms, tiny_ckpt):
    from cxrsam.prompts import Prompts, PromptSet

    loaded = build_sam("tiny_sam", checkpoint=tiny_ckpt)
    trainee = ft.SamTrainee(loaded).eval()
    image = prompted_data(phantoms)[0][0][None]
    a = PromptSet(points=np.array([[10, 20], [12, 30], [14, 28]], np.float32), labels=np.array([1, 1, 0]))
    b = PromptSet(points=np.array([[40, 20]], np.float32), labels=np.array([1]))
    size = (TINY_SIZE, TINY_SIZE)
    with torch.no_grad():
        both = trainee(image, [Prompts([a, b], size, "points", 2)])[0][0]
        alone = [trainee(image, [Prompts([s], size, "points", 1)])[0][0][0] for s in (a, b)]
    assert both.shape[0] == 2
    assert torch.allclose(both[0], alone[0], atol=1e-5) and torch.allclose(both[1], alone[1], atol=1e-5)


def test_interactive_examples_learn_from_a_second_pass_with_a_click_on_the_first_passs_error(phantoms, tiny_ckpt):
    from cxrsam.data.layouts import discover
    from cxrsam.prompts import PromptMixture
    from cxrsam.prompts.corrections import error_click

    cases = discover(phantoms).cases[:4]
    mixture = PromptMixture(weights={"box": 1.0}, interactive=0.5)
    data = ft.PromptedDataset(cases, tiny_spec().transform, "mixed", jitter=0.2, seed=3, mixture=mixture)
    flags = [[data[i][5] for i in range(4)] for data.epoch in range(6)]
    assert 0.2 < np.mean(flags) < 0.8 and flags == [[data[i][5] for i in range(4)] for data.epoch in range(6)]
    assert not any(ft.PromptedDataset(cases, tiny_spec().transform, "box", seed=3)[i][5] for i in range(4))
    data.epoch = 0
    batch = ft.collate_prompted([data[i] for i in range(4)])
    images, masks, _, prompts, targets, _ = batch
    loaded = build_sam("tiny_sam", checkpoint=tiny_ckpt)
    trainee = ft.SamTrainee(loaded).eval()
    refined = ft.with_error_clicks(trainee, images, masks, prompts, [True, False, True, False])
    assert refined[1] is prompts[1] and refined[3] is prompts[3]
    with torch.no_grad():
        first = ft.union_logits(trainee(images, prompts), TINY_SIZE)[:, 0] > 0
    for i in (0, 2):
        truth = masks[i, 0].numpy() > 0.5
        point, label, _ = error_click(truth, first[i].numpy())
        added = [(p, lab) for s, old in zip(refined[i].sets, prompts[i].sets)
                 for p, lab in zip(s.points if s.points is not None else [], s.labels if s.labels is not None else [])
                 if old.points is None or len(s.points) > len(old.points)]
        assert len(added) == 1 and np.array_equal(added[0][0], point) and added[0][1] == label
        assert truth[int(point[1]), int(point[0])] == bool(label)  # asks for lung where lung is, less where not
    # the step learns from the refined prompts: its loss is the loss of the second pass
    torch.manual_seed(0)
    step = ft.finetune_step()(trainee, (images, masks, None, prompts, targets, [True, False, True, False]))
    with torch.no_grad():
        second = ft.segmentation_loss(trainee(images, refined), targets)
        plain = ft.segmentation_loss(trainee(images, prompts), targets)
    assert step.item() == pytest.approx(second.item(), rel=1e-5) and step.item() != pytest.approx(plain.item())


def test_click_rounds_with_the_previous_result_follow_sams_loop_and_train_the_mask_prompt_layers(phantoms, tiny_ckpt):
    from cxrsam.data.layouts import discover
    from cxrsam.prompts import PromptMixture, add_points, with_previous
    from cxrsam.prompts.corrections import error_click

    cases = discover(phantoms).cases[:4]
    mixture = PromptMixture(weights={"box": 1.0}, interactive=1.0, click_rounds=3, previous_mask=True)
    data = ft.PromptedDataset(cases, tiny_spec().transform, "mixed", jitter=0.2, seed=3, mixture=mixture)
    rounds = [[data[i][5] for i in range(4)] for data.epoch in range(6)]
    assert {k for epoch in rounds for k in epoch} == {1, 2, 3}
    assert rounds == [[data[i][5] for i in range(4)] for data.epoch in range(6)]  # seeded
    data.epoch = 0
    images, masks, _, prompts, targets, _ = ft.collate_prompted([data[i] for i in range(4)])
    loaded = build_sam("tiny_sam", checkpoint=tiny_ckpt)
    lora.apply_lora(loaded.model, lora.LoraSettings(rank=2, train_mask_prompt=True))
    trainee = ft.SamTrainee(loaded).eval()
    refined = ft.with_error_clicks(trainee, images, masks, prompts, [2, 0, 1, 0], previous_mask=True)
    assert refined[1] is prompts[1] and refined[3] is prompts[3]
    # image 0 by hand: decode, click its largest error, give every set the logits; twice
    expected = prompts[0]
    with torch.no_grad():
        embedding = trainee.sam.image_encoder(images[:1])
        for _ in range(2):
            logits = trainee.decode_sets(embedding, [expected])[0][0]
            click = error_click(masks[0, 0].numpy() > 0.5, (logits > 0).any(dim=0).numpy())
            expected = with_previous(add_points(expected, click.point[None], np.array([click.label])), logits.numpy())
    for got, want in zip(refined[0].sets, expected.sets):
        assert np.array_equal(got.points, want.points) and np.allclose(got.logits, want.logits, atol=1e-5)
    assert all(s.logits is not None for s in refined[2].sets)
    assert all(s.logits is None for s in ft.with_error_clicks(trainee, images, masks, prompts, [1, 0, 0, 0])[0].sets)
    # the mask-prompt layers learn from a step with mask prompts, and stay in the graph (zero) without one
    layers = [p for name, p in trainee.named_parameters() if name.startswith("sam." + lora.MASK_PROMPT_LAYERS)]
    assert layers and all(p.requires_grad for p in layers)
    ft.finetune_step(previous_mask=True)(trainee, (images, masks, None, prompts, targets, [2, 0, 1, 0])).backward()
    assert all(p.grad is not None for p in layers) and sum(p.grad.abs().sum() for p in layers) > 0
    trainee.zero_grad(set_to_none=True)
    ft.finetune_step(previous_mask=True)(trainee, (images, masks, None, prompts, targets, [0, 0, 0, 0])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in layers)
    # with first_round_loss the interactive examples' drawn prompts alone are learnt from too (SAM's loss per round)
    step = ft.finetune_step(previous_mask=True, first_round_loss=True)
    both = step(trainee, (images, masks, None, prompts, targets, [2, 0, 1, 0]))
    with torch.no_grad():
        last = ft.segmentation_loss(trainee(images, refined), targets)
        first = ft.segmentation_loss(trainee(images[[0, 2]], [prompts[0], prompts[2]]), [targets[0], targets[2]])
    assert both.item() == pytest.approx(last.item() + first.item(), rel=1e-5)
    frozen = build_sam("tiny_sam", checkpoint=tiny_ckpt)
    lora.apply_lora(frozen.model, lora.LoraSettings(rank=2, train_prompt_encoder=True))
    assert not any(p.requires_grad for name, p in frozen.model.named_parameters()
                   if name.startswith(lora.MASK_PROMPT_LAYERS))


def _interactive_ddp_rank(rank: int, checkpoint: str, phantoms: str, port: int) -> None:
    """One of two gloo processes: a DDP-wrapped trainee takes an interactive step (two click rounds with the previous
    result as mask prompt) that only rank 0 flags."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cxrsam.data.layouts import discover

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    BACKENDS["tiny_sam"] = tiny_spec()
    lora.apply_lora((loaded := build_sam("tiny_sam", checkpoint=checkpoint)).model,
                    lora.LoraSettings(rank=2, train_mask_prompt=True))
    net = DistributedDataParallel(ft.SamTrainee(loaded).train())
    data = ft.PromptedDataset(discover(phantoms).cases[:2], tiny_spec().transform, "box", seed=rank)
    images, masks, _, prompts, targets, _ = ft.collate_prompted([data[i] for i in range(2)])
    step = ft.finetune_step(previous_mask=True, first_round_loss=True)  # rank 1: no mask prompt, no gradient there
    step(net, (images, masks, None, prompts, targets, [2 if rank == 0 else 0, 0])).backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    every = [torch.zeros_like(grads) for _ in range(2)]
    dist.all_gather(every, grads)
    if not torch.equal(every[0], every[1]) or grads.abs().sum() == 0:
        raise SystemExit(3)  # the ranks' collectives went out of step: gradients not averaged alike
    dist.destroy_process_group()


def test_an_interactive_step_flagged_on_one_ddp_rank_only_does_not_stall_the_other(phantoms, tiny_ckpt):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    workers = [context.Process(target=_interactive_ddp_rank, args=(r, str(tiny_ckpt), str(phantoms), port))
               for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    stalled = [w for w in workers if w.is_alive()]
    for worker in stalled:
        worker.kill()
    assert not stalled and [w.exitcode for w in workers] == [0, 0]


def test_a_short_point_prompt_run_on_real_x_rays_beats_zero_shot_litemedsam_with_points(shared_data, tmp_path):
    """Issue 18, the short run a test can afford: 8 steps of point-prompt LoRA (adapters, prompt encoder and mask
    decoder open) on 16 real training images lift LiteMedSAM's Dice with 30 probability points from its box-trained
    zero-shot level (epoch 0, the untouched model) on held-out validation images (measured: 0.56 -> 0.91)."""
    config = ft.make_config(data=shared_data, backend="litemedsam", split=(0.8, 0.1, 0.1), train_prompt="mixed",
                            train_mix={"weights": {"points": 1.0}}, train_decoder=True, train_prompt_encoder=True,
                            val_prompts={"mode": "points", "strategy": "probability", "points": 30},
                            max_train_cases=16, max_val_cases=4, epochs=1, steps_per_epoch=8, batch_size=2,
                            lr=5e-4, warmup_steps=2, augment=False, rank=4, patience=None, progress=False)
    run = ft.finetune(config, tmp_path / "points")
    metrics = pd.read_csv(run / "metrics.csv").set_index("epoch")
    zero_shot, trained = metrics.loc[0, "val_dice"], metrics.loc[1, "val_dice"]
    assert zero_shot < 0.7 and trained > zero_shot + 0.2, (zero_shot, trained)
    assert json.loads((run / "adapter.json").read_text())["lora"]["train_prompt_encoder"]


def test_a_run_started_from_another_starts_where_it_ended_and_refuses_what_it_could_not_rebuild(
        phantoms, tiny_ckpt, tmp_path):
    """Issue 18: ``init_from`` (a box-trained run continued with mixed prompts and the decoder opened)."""
    first = ft.finetune(tiny_config(phantoms, tiny_ckpt, train_decoder=False, epochs=1, validate_start=False),
                        tmp_path / "box")  # kept: its trained epoch 1, not the base
    base_val = pd.read_csv(ft.finetune(tiny_config(phantoms, tiny_ckpt, epochs=1, max_steps=1), tmp_path / "base")
                           / "metrics.csv").val_dice[0]
    first_val = pd.read_csv(first / "metrics.csv").val_dice.tolist()
    config = tiny_config(phantoms, tiny_ckpt, epochs=1, init_from=first, train_prompt_encoder=True,
                         keep_resume_state=True)
    second = ft.finetune(config, tmp_path / "mixed")
    second_val = pd.read_csv(second / "metrics.csv").set_index("epoch").val_dice
    assert second_val[0] == pytest.approx(first_val[0], abs=1e-6)  # epoch 0 is the first run's kept weights ...
    assert first_val[0] != pytest.approx(base_val, abs=1e-4)  # ... which are not the base's
    from safetensors.torch import load_file

    before = load_file(str(first / "adapter.safetensors"))
    trained = load_checkpoint(second / "last.pt")["model"]
    assert set(before) < set(trained)  # the decoder and prompt embeddings are opened on top of the adapters
    assert all(not torch.equal(before[k], trained[k]) for k in before)  # and training went on from there
    import shutil

    moved = tmp_path / "box-moved"
    shutil.move(first, moved)  # a resumed run needs only its own folder, not the run it started from
    assert ft.finetune(ft.read_config(second), second, resume=True) == second
    shutil.move(moved, first)
    with pytest.raises(CxrsamError, match="other adapters .*rank 4, here 8"):
        ft.finetune(tiny_config(phantoms, tiny_ckpt, init_from=first, rank=8), tmp_path / "rank")
    with pytest.raises(CxrsamError, match="keeps frozen"):
        ft.finetune(tiny_config(phantoms, tiny_ckpt, init_from=second, train_decoder=False), tmp_path / "frozen")
    with pytest.raises(CxrsamError, match="not a finished LoRA run"):
        ft.finetune(tiny_config(phantoms, tiny_ckpt, init_from=tmp_path), tmp_path / "none")
