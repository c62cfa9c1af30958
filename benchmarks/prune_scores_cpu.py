"""Importance scores and pruning on the CPU, each timed as a ratio to the floor: one dense
calibration forward over the same samples (encoding + a plain ``model(**inputs)`` per sample).

Model: the same ~100M-parameter random Qwen2-VL-shaped model as benchmarks/ships_cpu.py (12 layers,
12 query heads, 2 KV heads, hidden 768, MLP 3072, a small ViT, up to 64 image tokens);
calibration: utility samples of the synthetic VLGuard set (prompt + answer, with an image).
Each timing is the best of ``--repeat`` runs (the machine may be shared); pruning restores the
dense weights before every run, untimed.

    .venv/bin/python benchmarks/prune_scores_cpu.py [--samples 32] [--repeat 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsr_lib.adapters import adapter_for  # noqa: E402
from hsr_lib.data import load_records, split_records  # noqa: E402
from hsr_lib.models import LoadedModel  # noqa: E402
from hsr_lib.prompts import encode_calibration  # noqa: E402
from hsr_lib.prune import prune_model  # noqa: E402
from hsr_lib.scores import compute_scores  # noqa: E402
from hsr_lib.synthetic import make_synthetic_vlguard  # noqa: E402
from hsr_lib.tiny import TinyText, build_tiny  # noqa: E402

TEXT = TinyText(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=3072)
VISION = dict(depth=4, embed_dim=384, num_heads=6, mlp_ratio=4)
MAX_PIXELS = 224 * 224


def build() -> LoadedModel:
    """The benchmark model (float32, CPU)."""
    model, processor = build_tiny("qwen2_vl", text=TEXT, vision=VISION, max_pixels=MAX_PIXELS)
    return LoadedModel(model, processor, adapter_for(model.config), "bench:qwen2_vl-100M",
                       torch.device("cpu"), torch.float32)


def best_of(fn: Callable[[], object], repeat: int, before: Callable[[], None] | None = None) -> float:
    """The shortest wall time of ``repeat`` calls of ``fn`` (``before`` runs untimed first)."""
    times = []
    for _ in range(repeat):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--methods", default="wanda,sparsegpt,snip")
    ap.add_argument("--skip-sequential-snip", action="store_true", help="its cost grows with layers²: slow")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = build()
    n_lin = sum(v.weight.numel() for v in lm.prunable_linears().values())
    dense = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        tj = make_synthetic_vlguard(d, n_records=2 * args.samples + 2, seed=0)
        samples = split_records(load_records(tj), d)["utility"][: args.samples]
        cals = [encode_calibration(lm.processor, s, "paper", lm.adapter) for s in samples]

        @torch.no_grad()
        def floor() -> None:
            for s in samples:
                c = encode_calibration(lm.processor, s, "paper", lm.adapter)
                lm.model(**c.inputs, use_cache=False)

        def restore() -> None:
            lm.model.load_state_dict(dense)

        out: dict = {"floor_s": best_of(floor, args.repeat)}
        for m in args.methods.split(","):
            out[f"{m}_scores_s"] = best_of(lambda: compute_scores(lm, samples, [m], progress=False), args.repeat)
            seq = [False] if (m == "snip" and args.skip_sequential_snip) else [False, True]
            for sequential in seq:
                key = f"{m}_prune{'' if sequential else '_oneshot'}_s"
                rep = 1 if (m == "snip" and sequential) else args.repeat
                out[key] = best_of(lambda: prune_model(lm, samples, m, 0.5, sequential=sequential, progress=False),
                                   rep, restore)
        restore()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, no GPU",
        "model": f"random Qwen2-VL architecture, {sum(p.numel() for p in lm.model.parameters()) / 1e6:.1f}M parameters "
                 f"({n_lin / 1e6:.1f}M in prunable decoder linears), 12 layers, hidden 768",
        "samples": args.samples, "seq_len_mean": sum(c.input_ids.shape[0] for c in cals) / len(cals),
        "response_len_mean": sum(c.n_response for c in cals) / len(cals), "repeat": args.repeat,
        "times_s": {k: round(v, 2) for k, v in out.items()},
        "ratio_to_floor": {k.removesuffix("_s"): round(v / out["floor_s"], 2) for k, v in out.items() if k != "floor_s"},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
