"""ViT encoder export: the encoder as it is against its global attention in steps (ViTEncoderGraph), in ONNX Runtime.

Both graphs are exported from the same ViT (random weights drawn with seed 0: speed and memory do not depend on
them) and run on the same model input (a phantom); each variant runs in a fresh process of its own, in turn, for
``--repeats`` rounds, so machine load hits both alike. Per process: the session is made and run once (warm-up),
then ``--runs`` timed runs; its peak resident memory in these runs above the loaded session's (Linux: ``VmHWM`` reset
through ``/proc/self/clear_refs``) is the encoder's working memory.

    PYTHONPATH=src:bench python bench/vit_graph.py --backend vit_b --repeats 3 --runs 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS = ("as it is", "in steps")


def memory_mb(field: str) -> float:
    """This process's ``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) in MB (Linux)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child(path: Path, backend: str, batch: int, runs: int, out: Path) -> None:
    """Run one exported encoder: write its timings, memory (MB) and embedding to ``out`` (json + npy)."""
    from cxrsam.data.synthetic import make_phantom
    from cxrsam.sam.onnx_cache import inference_session
    from cxrsam.sam.registry import get_backend

    spec = get_backend(backend)
    image = make_phantom(size=512, seed=0)[0].astype(np.float32) / 255
    model_input = spec.transform.images([image] * batch)
    session = inference_session(path)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak (VmHWM) starts again from the loaded session
    loaded = memory_mb("VmRSS")
    embedding = session.run(None, {"image": model_input})[0]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"image": model_input})
        times.append((time.perf_counter() - start) / batch)
    peak = memory_mb("VmHWM")
    np.save(out.with_suffix(".npy"), embedding)
    out.write_text(json.dumps({"times": times, "loaded_mb": loaded, "peak_mb": peak}))


def export(backend: str, folder: Path) -> dict[str, Path]:
    """Both encoder graphs of ``backend`` with seed-0 weights, in ``folder``."""
    import torch

    from cxrsam.sam.onnx_export import EncoderGraph, ViTEncoderGraph, export_encoder
    from cxrsam.sam.registry import get_backend

    spec = get_backend(backend)
    torch.manual_seed(0)
    model = spec.builder().eval()
    paths = {}
    for name, graph in zip(VARIANTS, (EncoderGraph(model), ViTEncoderGraph(model)), strict=True):
        paths[name] = folder / f"{name.replace(' ', '-')}.onnx"
        export_encoder(graph, spec.img_size, paths[name])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vit_b", help="A segment_anything ViT backend")
    parser.add_argument("--batch", type=int, default=1, help="Images per encoder call")
    parser.add_argument("--repeats", type=int, default=3, help="Rounds of the two processes")
    parser.add_argument("--runs", type=int, default=3, help="Timed encoder calls per process")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.backend, args.batch, args.runs, args.out)
        return
    from zero_shot_speed import machine

    print(f"Machine: {machine('cpu')}. Backend {args.backend}, batch {args.batch}, {args.runs} timed runs per "
          f"process, {args.repeats} rounds.")
    with tempfile.TemporaryDirectory() as tmp:
        paths = export(args.backend, Path(tmp))
        results = {name: [] for name in VARIANTS}
        for round_ in range(args.repeats):
            for name, path in paths.items():
                out = Path(tmp) / f"{name.replace(' ', '-')}-{round_}.json"
                subprocess.run([sys.executable, __file__, "--backend", args.backend, "--batch", str(args.batch),
                                "--runs", str(args.runs), "--child", str(path), "--out", str(out)], check=True)
                results[name].append(json.loads(out.read_text()))
                print(f"round {round_ + 1}, {name}: {[round(t, 2) for t in results[name][-1]['times']]} s/image",
                      flush=True)
        embeddings = {name: np.load(Path(tmp) / f"{name.replace(' ', '-')}-0.npy") for name in VARIANTS}
    reference = embeddings[VARIANTS[0]]
    base = statistics.median(t for r in results[VARIANTS[0]] for t in r["times"])
    print("\n| encoder graph | s per image (median) | speed-up | peak memory above the loaded session, MB (median) "
          "| max abs embedding difference |\n|---|---|---|---|---|")
    for name in VARIANTS:
        seconds = statistics.median(t for r in results[name] for t in r["times"])
        working = statistics.median(r["peak_mb"] - r["loaded_mb"] for r in results[name])
        diff = float(np.abs(embeddings[name] - reference).max())
        print(f"| {name} | {seconds:.2f} | {base / seconds:.2f}x | {working:.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
