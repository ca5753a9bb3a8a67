"""The SAM engine on a tiny segment_anything model: equal to Meta's one-image predictor, cached, differentiable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor

from cxrsam.prompts import Prompts, PromptSet, prompts_from_mask
from cxrsam.sam.engine import PromptBatch, SamEngine, decode
from cxrsam.sam.registry import build_sam
from cxrsam.sam.testing import tiny_spec


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    return build_sam(tiny_spec(), checkpoint=tiny_checkpoint)


def reference_logits(model, pixels: np.ndarray, prompts: Prompts, multimask: bool) -> torch.Tensor:
    """One image at a time through segment_anything's own SamPredictor: per-set logits (P, H, W)."""
    predictor = SamPredictor(model)
    size = pixels.shape
    h, w = predictor.transform.get_preprocess_shape(*size, predictor.transform.target_length)
    image = F.interpolate(torch.from_numpy(pixels)[None, None], (h, w), mode="bilinear", align_corners=False,
                          antialias=True).expand(1, 3, h, w) * 255.0
    predictor.set_torch_image(image, size)
    out = []
    for prompt_set in prompts.sets:
        boxes = coords = labels = None
        if prompt_set.box is not None:
            boxes = predictor.transform.apply_boxes_torch(torch.from_numpy(prompt_set.box)[None], size)
        if prompt_set.points is not None:
            coords = predictor.transform.apply_coords_torch(torch.from_numpy(prompt_set.points)[None], size)
            labels = torch.from_numpy(prompt_set.labels)[None]
        logits, iou, _ = predictor.predict_torch(coords, labels, boxes, multimask_output=multimask, return_logits=True)
        out.append(logits[0, int(iou[0].argmax())])
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["box", "points", "box+points"])
@pytest.mark.parametrize("multimask", [False, True])
def test_batched_engine_equals_one_image_reference(tiny, cases, mode, multimask):
    engine = SamEngine(tiny, batch_size=3)
    prompts = [prompts_from_mask(mask, mode=mode, points_per_lung=3, negatives=("outside",)) for _, mask in cases]
    assert all(len(p.sets) == 2 for p in prompts)
    masks = engine.segment_many([image for image, _ in cases], prompts, multimask=multimask)
    assert engine.images_encoded == 3
    for (image, _), prompt, mask in zip(cases, prompts, masks):
        expected = reference_logits(tiny.model, image, prompt, multimask)
        got = engine.decode_logits(engine.embed([image])[0], prompt, multimask)
        assert got.shape == expected.shape == (2, *image.shape)
        assert isinstance(got, np.ndarray) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected.numpy(), atol=2e-4, rtol=1e-4)
        union = (expected > 0).any(dim=0).numpy()
        clear = (expected.abs() > 1e-3).all(dim=0).numpy()
        assert mask.shape == image.shape and mask.dtype == bool
        assert np.array_equal(mask[clear], union[clear])
    assert engine.images_encoded == 3  # decode_logits above reused the cached embeddings


def test_cache_never_re_encodes_and_separates_weights(tiny, cases, tmp_path):
    calls = []
    hook = tiny.model.image_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        images = [image for image, _ in cases]
        engine = SamEngine(tiny, cache_dir=tmp_path, batch_size=2)
        first = engine.embed(images + [images[0].copy()])  # a duplicate image is encoded once
        assert calls == [2, 1] and engine.images_encoded == 3
        engine.embed(images)
        for mode in ("box", "points", "box+points"):
            engine.segment(images[1], prompts_from_mask(cases[1][1], mode=mode))
        assert calls == [2, 1]
        assert len(list(tmp_path.glob("*.npz"))) == 3

        again = SamEngine(tiny, cache_dir=tmp_path)  # a new process: embeddings come from disk
        assert all(np.array_equal(a, b) for a, b in zip(again.embed(images), first))
        assert calls == [2, 1] and again.images_encoded == 0

        next(tmp_path.glob("*.npz")).write_bytes(b"damaged")
        assert SamEngine(tiny, cache_dir=tmp_path).embed(images) and sum(calls) == 4  # recomputed, not fatal

        tuned = SamEngine(tiny, cache_dir=tmp_path, model_id="lora-run-1")  # other weights: other keys
        tuned.embed(images)
        assert tuned.images_encoded == 3 and len(list(tmp_path.glob("*.npz"))) == 6
    finally:
        hook.remove()


def test_empty_draft_gives_empty_mask_without_encoding(tiny, cases):
    engine = SamEngine(tiny)
    image = cases[0][0]
    prompts = prompts_from_mask(np.zeros(image.shape, bool))
    mask = engine.segment(image, prompts)
    assert prompts.warnings and not mask.any() and mask.shape == image.shape
    assert engine.images_encoded == 0


def test_mixed_prompt_sets_and_size_mismatch(tiny, cases):
    engine = SamEngine(tiny)
    image, mask = cases[1]
    base = prompts_from_mask(mask, mode="box+points", points_per_lung=2)
    mixed = Prompts([base.sets[0], PromptSet(box=base.sets[1].box)], base.image_size, "box+points", 2)
    logits = engine.decode_logits(engine.embed([image])[0], mixed)
    single = engine.decode_logits(engine.embed([image])[0], Prompts([mixed.sets[1]], base.image_size, "box", 1))
    np.testing.assert_allclose(logits[1], single[0], atol=1e-6)
    from cxrsam.errors import CxrsamError

    with pytest.raises(CxrsamError, match="prompts are for"):
        engine.segment(cases[0][0], base)


def test_decode_is_differentiable_and_batched(tiny, cases):
    model = tiny.model
    images = [cases[0][0], cases[0][0][::-1].copy()]
    x = tiny.spec.transform.images([torch.from_numpy(image) for image in images])
    assert torch.is_tensor(x) and x.shape == (2, 3, 64, 64)
    embeddings = model.image_encoder(x)
    size = images[0].shape
    boxes = tiny.spec.transform.boxes(np.array([[[10, 20, 40, 80], [50, 20, 85, 80]]] * 2, float), size)
    batch = PromptBatch(boxes=torch.tensor(boxes, dtype=torch.float32))
    logits, iou = decode(model, embeddings, batch, multimask=True)
    assert logits.shape == (2, 2, 3, 32, 32) and iou.shape == (2, 2, 3)
    full = tiny.spec.transform.logits_to_image(logits[:, :, 0], size)
    assert full.shape == (2, 2, *size)
    full.sigmoid().mean().backward()
    grads = [p.grad for p in model.image_encoder.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_mask_prompt_takes_image_logits_into_the_padded_low_res_frame(tiny):
    transform = tiny.spec.transform  # S = 64, the tiny model's mask prompt is 32 x 32
    from cxrsam.sam.transforms import PAD_LOGIT

    square = torch.randn(2, 64, 64)
    assert torch.equal(transform.logits_to_frame(square, (64, 64)), square)  # the training frame: unchanged
    wide = torch.full((1, 40, 80), 3.0)  # resized to 32 x 64: the lower half of the input is padding
    prompt = transform.mask_prompt(wide, (40, 80), 32)
    assert prompt.shape == (1, 1, 32, 32)
    assert torch.allclose(prompt[0, 0, :15], torch.tensor(3.0)) and torch.allclose(prompt[0, 0, 17:],
                                                                                   torch.tensor(PAD_LOGIT))
    from cxrsam.prompts import with_previous  # prompts taken to the model frame take their previous logits along

    given = with_previous(Prompts([PromptSet(box=np.array([2, 2, 70, 30], np.float32))], (40, 80), "box", 1),
                          [np.full((40, 80), 3.0)])
    moved = transform.prompts(given).sets[0].logits
    assert moved.shape == (64, 64) and np.allclose(moved[:32], 3.0) and np.allclose(moved[32:], PAD_LOGIT)
    # a smooth low-res result taken to a non-square image and back is where it was (up to interpolation)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    low = (8 * torch.exp(-((yy - 10) ** 2 + (xx - 14) ** 2) / 128) - 2)[None]  # a lung-like blob around (14, 10)
    again = transform.mask_prompt(transform.logits_to_image(low, (50, 100)), (50, 100), 32)[:, 0]
    assert (again[:, 1:15, 1:31] - low[:, 1:15, 1:31]).abs().max() < 0.1


def test_clicks_are_replayed_as_sams_interactive_loop_for_a_model_trained_with_its_previous_result(tiny, cases):
    import dataclasses

    from cxrsam.prompts import add_points

    image, mask = cases[1]  # 80 x 110: padded
    prompts = prompts_from_mask(mask, mode="box")
    points, labels = np.array([[30.0, 40.0], [80.0, 50.0]], np.float32), np.array([1, 0])
    plain = SamEngine(tiny)
    embedding = plain.embed([image])[0]
    # a model without the mask prompt: all the clicks decoded once, as before
    final, logits, _ = plain.decode_clicks(embedding, prompts, points, labels)
    np.testing.assert_array_equal(logits, plain.decode_logits(embedding, add_points(prompts, points, labels)))
    assert all(s.logits is None for s in final.sets)
    # a model trained with its previous result: one round per click, each given the last round's low-res logits
    engine = SamEngine(dataclasses.replace(tiny, mask_prompt=True))
    final, logits, iou = engine.decode_clicks(embedding, prompts, points, labels)
    assert sum(len(s.points) for s in final.sets) == 2 and all(s.logits.shape == image.shape for s in final.sets)
    assert not np.allclose(logits, plain.decode_logits(embedding, add_points(prompts, points, labels)))
    # segment_anything's own loop: its predictor, each set prompted with its clicks so far and given the low-res
    # logits its previous round returned as mask_input; the result at the image's size is the engine's
    predictor = SamPredictor(tiny.model)
    h, w = predictor.transform.get_preprocess_shape(*image.shape, predictor.transform.target_length)
    pixels = F.interpolate(torch.from_numpy(image)[None, None], (h, w), mode="bilinear", align_corners=False,
                           antialias=True).expand(1, 3, h, w) * 255.0
    predictor.set_torch_image(pixels, image.shape)

    def sam_round(round_prompts, previous):
        full, low = [], []
        for prompt_set, mask_input in zip(round_prompts.sets, previous):
            box = predictor.transform.apply_boxes_torch(torch.from_numpy(prompt_set.box)[None], image.shape)
            coords, point_labels = None, None
            if prompt_set.points is not None:
                coords = predictor.transform.apply_coords_torch(torch.from_numpy(prompt_set.points)[None],
                                                                image.shape)
                point_labels = torch.from_numpy(prompt_set.labels)[None]
            masks, _, low_res = predictor.predict_torch(coords, point_labels, box, mask_input, multimask_output=False,
                                                        return_logits=True)
            full.append(masks[0, 0])
            low.append(low_res)
        return torch.stack(full), low

    expected, low = sam_round(prompts, [None] * len(prompts.sets))
    round_prompts = prompts
    for k in range(len(points)):
        before = low
        round_prompts = add_points(round_prompts, points[k:k + 1], labels[k:k + 1])
        expected, low = sam_round(round_prompts, before)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)
    # only the result and the record go to the image's size, however many clicks: the rounds stay low-res
    calls = []
    transform = engine.loaded.spec.transform
    original = transform.logits_to_image
    transform.logits_to_image = lambda *args: calls.append(1) or original(*args)
    try:
        engine.decode_clicks(embedding, prompts, np.concatenate([points, points + 5]), np.concatenate([labels] * 2))
    finally:
        del transform.logits_to_image
    assert len(calls) == 2
    # the returned prompts carry, at the image's size, the low-res logits the last round was given
    for prompt_set, given in zip(final.sets, before):
        shown = tiny.spec.transform.logits_to_image(given[0, 0], image.shape)
        np.testing.assert_allclose(prompt_set.logits, shown.numpy(), atol=1e-4)
