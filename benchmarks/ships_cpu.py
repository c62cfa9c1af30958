"""Ships on the CPU: the naive loop (one full forward per head per prompt) vs the engine, both in
one process, on a ~100M-parameter random Qwen2-VL-shaped model (12 layers, 12 query heads, 2 KV
heads, hidden 768), all heads, prompts with an image. Prints wall times, the ratio and the largest
score difference; --json writes them.

    .venv/bin/python benchmarks/ships_cpu.py [--prompts 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hsr_lib.adapters import adapter_for  # noqa: E402
from hsr_lib.data import load_records, split_records  # noqa: E402
from hsr_lib.models import LoadedModel  # noqa: E402
from hsr_lib.prompts import encode_prompt  # noqa: E402
from hsr_lib.ships_engine import AblationConfig, ships_engine, ships_naive  # noqa: E402
from hsr_lib.synthetic import make_synthetic_vlguard  # noqa: E402
from hsr_lib.tiny import TinyText, build_tiny  # noqa: E402

TEXT = TinyText(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=3072)
VISION = dict(depth=4, embed_dim=384, num_heads=6, mlp_ratio=4)  # a small ViT; Qwen2-VL-7B's has depth 32
MAX_PIXELS = 224 * 224  # up to 64 image tokens after the 2×2 merge


def build() -> LoadedModel:
    model, processor = build_tiny("qwen2_vl", text=TEXT, vision=VISION, max_pixels=MAX_PIXELS)
    return LoadedModel(model, processor, adapter_for(model.config), "bench:qwen2_vl-100M",
                       torch.device("cpu"), torch.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = build()
    n_params = sum(p.numel() for p in lm.model.parameters())
    n_lm = sum(p.numel() for p in lm.adapter.language_model(lm.model).parameters())
    with tempfile.TemporaryDirectory() as d:
        tj = make_synthetic_vlguard(d, n_records=2 * args.prompts + 2, seed=0)
        samples = split_records(load_records(tj), d)["safety"][: args.prompts]
        prompts = [encode_prompt(lm.processor, s) for s in samples]
    seq = [p["input_ids"].shape[1] for p in prompts]
    cfg = AblationConfig()
    t0 = time.perf_counter()
    fast = ships_engine(lm, prompts, cfg, batch_heads="auto", progress=False)
    t_engine = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = ships_naive(lm, prompts, cfg, progress=True)
    t_naive = time.perf_counter() - t0
    diff = {k: max(abs(fast[k][h] - slow[k][h]) for h in fast[k]) for k in fast}
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "model": f"random Qwen2-VL architecture, {n_params / 1e6:.1f}M parameters ({n_lm / 1e6:.1f}M language model), "
                 f"12 layers × 12 heads (2 KV heads), hidden 768",
        "prompts": args.prompts, "heads": len(fast["kl"]), "seq_len_mean": sum(seq) / len(seq),
        "naive_s": round(t_naive, 2), "engine_s": round(t_engine, 2), "speedup": round(t_naive / t_engine, 2),
        "max_abs_diff": diff,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
