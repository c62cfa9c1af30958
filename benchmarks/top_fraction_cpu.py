"""T(X, f), the exact top-fraction selection of realignment: the two-pass version (threshold
bracketed from a sample, exact selection among the entries near it) against a full O(n)
``kthvalue`` over every entry, on 7B-size matrices (4096 × 4096 = 16.7 M entries), in one process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/top_fraction_cpu.py
"""

from __future__ import annotations

import platform
import time

import torch

import hsr_lib.realign as R


def timed(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4096, 4096, generator=g).abs() * torch.rand(4096, 1, generator=g)
    rows = []
    for name, X in (("float32", base), ("bf16-rounded (ties)", base.bfloat16().float())):
        flat = X.reshape(-1).float()
        for f in (0.0035, 0.5, 0.7):
            k = int(f * flat.numel())
            t_old = timed(lambda: R._top_k_exact(flat, k))  # the baseline: one kthvalue over every entry
            t_new = timed(lambda: R._top_k_bracketed(flat, k))
            new = R._top_k_bracketed(flat, k)
            same = new is not None and torch.equal(new, R._top_k_exact(flat, k))
            rows.append((name, f, t_old, t_new, t_old / t_new, same))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| scores (4096 × 4096) | f | full kthvalue | two-pass | speed-up | same set |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} s | {r[3]:.3f} s | {r[4]:.1f}× | {r[5]} |")


if __name__ == "__main__":
    main()
