"""A miniature experiment end to end: every stage, the table's rows, the report files, and caching."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from cxrsam.errors import CxrsamError
from cxrsam.experiment import load_config, run_experiment
from cxrsam.experiment.cache import StageCache

MINI = {
    "name": "mini",
    "data": {"split": [0.5, 0.2, 0.3], "max_test_cases": 2, "synthetic": {"n": 12, "size": 64, "seed": 3}},
    "cnn": {"archs": ["unet", "deeplabv3plus"], "train": {"size": 64, "epochs": 1, "batch_size": 4}},
    "zero_shot": {"prompts": ["points", "box"], "draft_sources": ["unet", "oracle"], "sweep_points": [2, 4]},
    "lora": {"prompts": ["box"], "draft_sources": ["unet"], "val_draft_source": "oracle", "sweep_points": [4],
             "train": {"rank": 2, "max_steps": 1, "epochs": 1, "batch_size": 1, "max_train_cases": 2,
                       "max_val_cases": 1}},
}


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    (root / "mini.yaml").write_text(yaml.safe_dump(MINI))
    config = load_config(root / "mini.yaml")
    first = run_experiment(config, root / "run")
    second = run_experiment(config, root / "run")
    return first, second


def test_table_rows_and_report(mini_run):
    first, _ = mini_run
    assert list(first.table["method"]) == [
        "U-Net", "DeepLabv3+",
        "Zero-shot SAM, points (U-Net drafts)", "Zero-shot SAM, box (U-Net drafts)",
        "Zero-shot SAM, 2 points (U-Net drafts)", "Zero-shot SAM, 4 points (U-Net drafts)",
        "Zero-shot SAM, points (ground-truth drafts)", "Zero-shot SAM, box (ground-truth drafts)",
        "Zero-shot SAM, 2 points (ground-truth drafts)", "Zero-shot SAM, 4 points (ground-truth drafts)",
        "LoRA-SAM, box (U-Net drafts)", "LoRA-SAM, 4 points (U-Net drafts)",
    ]
    assert first.reference == "LoRA-SAM, box (U-Net drafts)"
    assert (first.table["n"] == 2).all()
    per_image = pd.read_csv(first.out_dir / "evaluation" / "per_image.csv")
    assert len(per_image) == 12 * 2 and per_image["dice"].between(0, 1).all()
    # Oracle boxes on phantoms: pretrained LiteMedSAM segments the dark lung fields well.
    oracle = per_image[per_image["method"] == "Zero-shot SAM, box (ground-truth drafts)"]
    assert oracle["dice"].mean() > 0.7
    html = first.report_html.read_text()
    assert "LoRA-SAM, box (U-Net drafts)" in html and html.count("data:image/png;base64,") >= 3
    md = first.report_md.read_text()
    assert "figures/dice_boxplot.png" in md and "figures/overlays.png" in md and "figures/lung_area.png" in md
    assert "figures/point_sweep.png" in md  # the sweep's Dice-vs-N curve (issue 18)
    assert len(list((first.out_dir / "stages" / "drafts-unet" / "masks").glob("*_prob.png"))) == 2
    sweep_json = next((first.out_dir / "stages" / "zs-4points-unet" / "masks").glob("*.json"))
    assert json.loads(sweep_json.read_text())["prompt_spec"]["points"] == 4
    assert "Quality flags (test images sent to review / images" in md  # SAM stages' JSONs carry the flags
    assert (first.out_dir / "manifest.csv").exists() and (first.out_dir / "config.yaml").exists()
    lora_dir = first.out_dir / "stages" / "lora"
    assert json.loads((lora_dir / "adapter.json").read_text())["trainable"]["lora"] > 0


def test_second_run_is_fully_cached(mini_run):
    first, second = mini_run
    assert "cnn-unet" in first.ran and "lora" in first.ran
    assert second.ran == [] and set(second.skipped) == set(first.ran)
    pd.testing.assert_frame_equal(first.per_image, second.per_image)


def test_lora_scale_reruns_only_the_lora_methods_and_zero_is_zero_shot(mini_run, tmp_path):
    first, _ = mini_run
    config = yaml.safe_load((first.out_dir.parent / "mini.yaml").read_text())
    config["lora"]["scale"] = 0.0
    (tmp_path / "scaled.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(first.out_dir, tmp_path / "run")
    scaled = run_experiment(load_config(tmp_path / "scaled.yaml"), tmp_path / "run")
    assert "lora" in scaled.skipped and "lora-embed" in scaled.ran
    assert all(stage.startswith("lora-") or stage == "evaluation" for stage in scaled.ran), scaled.ran
    wide = scaled.per_image.pivot(index="name", columns="method", values="dice")
    lora_rows = [m for m in wide.columns if m.startswith("LoRA-SAM")]
    assert lora_rows
    for method in lora_rows:
        pd.testing.assert_series_equal(wide[method], wide["Zero-shot SAM" + method.removeprefix("LoRA-SAM")],
                                       check_names=False)
    config["lora"]["scale"] = 1.5
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CxrsamError, match="lora.scale"):
        load_config(tmp_path / "bad.yaml")


def test_a_continued_lora_stage_starts_from_the_first_and_is_the_evaluated_model(mini_run, tmp_path):
    first, _ = mini_run
    config = yaml.safe_load((first.out_dir.parent / "mini.yaml").read_text())
    config["lora"]["continue_train"] = {"train_prompt": "mixed", "train_prompt_encoder": True, "lr": 0.05}
    (tmp_path / "continued.yaml").write_text(yaml.safe_dump(config))
    shutil.copytree(first.out_dir, tmp_path / "run")
    continued = run_experiment(load_config(tmp_path / "continued.yaml"), tmp_path / "run")
    assert "lora" in continued.skipped and {"lora-continued", "lora-embed"} <= set(continued.ran)
    stages = tmp_path / "run" / "stages"
    start = pd.read_csv(stages / "lora-continued" / "metrics.csv").set_index("epoch")
    assert start.loc[0, "val_dice"] == pytest.approx(pd.read_csv(stages / "lora" / "metrics.csv")["val_dice"].max())
    run_config = yaml.safe_load((stages / "lora-continued" / "config.yaml").read_text())
    assert run_config["init_from"].endswith("stages/lora") and run_config["train_prompt"] == "mixed"
    assert run_config["lora"]["rank"] == 2  # the first stage's options, continue_train's on top
    before = first.table.set_index("method")
    after = continued.table.set_index("method")
    name = "LoRA-SAM, box (U-Net drafts)"
    assert after.loc[name, "train_seconds"] > before.loc[name, "train_seconds"]  # both stages' time
    from cxrsam.files import sha256_file

    embedded = StageCache(stages).done("lora-embed")["result"]["model_id"]
    assert embedded == "lora:" + sha256_file(stages / "lora-continued" / "adapter.safetensors")[:16]
    assert embedded != "lora:" + sha256_file(stages / "lora" / "adapter.safetensors")[:16]  # it opened more
    assert "training_curves" in continued.report_md.read_text()


def test_a_copied_experiment_keeps_its_cache_and_reads_its_own_stages(mini_run, tmp_path):
    first, _ = mini_run
    shutil.copytree(first.out_dir, tmp_path / "copy")
    again = run_experiment(load_config(first.out_dir.parent / "mini.yaml"), tmp_path / "copy")
    assert again.ran == [] and set(again.skipped) == set(first.ran)
    stages = tmp_path / "copy" / "stages"
    assert StageCache(stages).done("lora")["result"]["run"] == str(stages / "lora")
    stored = "".join(path.read_text() for path in stages.glob("*/*.json"))
    assert str(first.out_dir) not in stored and "@stages/" in stored
    columns = ["name", "method", "dice"]
    pd.testing.assert_frame_equal(first.per_image[columns], again.per_image[columns])


def test_records_from_before_relative_paths_are_still_cached(tmp_path):
    from cxrsam.experiment.cache import key_hash

    stage = tmp_path / "stages" / "a"
    stage.mkdir(parents=True)
    key = {"upstream": str(tmp_path / "stages" / "b" / "run")}
    (stage / "done.json").write_text(json.dumps({"key": key_hash(key), "result": {"run": str(stage)}, "seconds": 1}))
    calls = []
    result = StageCache(tmp_path / "stages").run("a", key, lambda d: calls.append(d) or {})
    assert calls == [] and result["key"] == key_hash(key) and result["run"] == str(stage)


def test_changed_setting_reruns_only_downstream(tmp_path):
    calls = []
    cache = StageCache(tmp_path)
    a = cache.run("a", {"x": 1}, lambda d: calls.append("a") or {"v": 1})
    cache.run("b", {"a": a["key"]}, lambda d: calls.append("b") or {})
    cache.run("a", {"x": 1}, lambda d: calls.append("a") or {"v": 1})
    a2 = cache.run("a", {"x": 2}, lambda d: calls.append("a") or {"v": 2})
    cache.run("b", {"a": a2["key"]}, lambda d: calls.append("b") or {})
    assert calls == ["a", "b", "a", "b"]


def test_killed_stage_runs_again(tmp_path):
    cache = StageCache(tmp_path)

    def crash(stage_dir):
        (stage_dir / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.run("a", {"x": 1}, crash)
    assert cache.done("a") is None
    seen = []
    cache.run("a", {"x": 1}, lambda d: seen.append((d / "partial").exists()) or {})
    assert seen == [True]  # the stage sees what it left, so training can resume from last.pt


def test_bad_configs(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"zero_shot": {"draft_sources": ["vit"]}}))
    with pytest.raises(CxrsamError, match="draft source 'vit'"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({"cnn": {"arhcs": ["unet"]}}))
    with pytest.raises(CxrsamError, match="cnn.arhcs"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(CxrsamError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "twice.yaml").write_text("lora:\n  scale: 0.5\n  enabled: true\n  scale: null\n")
    with pytest.raises(CxrsamError, match=r"setting 'scale' given twice \(line 4\)"):
        load_config(tmp_path / "twice.yaml")


def test_the_study_never_writes_into_its_data(phantoms, tmp_path, folder_digest):
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(MINI))
    config = load_config(tmp_path / "mini.yaml", {"data.root": str(phantoms)})
    before = folder_digest(phantoms)
    with pytest.raises(CxrsamError, match="must not be an input"):
        run_experiment(config, phantoms / "study")
    assert folder_digest(phantoms) == before and not (phantoms / "study").exists()
