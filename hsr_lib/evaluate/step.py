"""The evaluation step (notebook 06): generate on every benchmark with every available variant,
judge, score and tabulate, writing everything to ``<run>/evaluate/``.

Artifacts: ``responses/<variant>/<benchmark>.jsonl`` (resumable), ``scores.jsonl`` (one row per
item, metric and judge), ``metrics.csv`` (benchmark-level, in %), ``judge_agreement.csv``,
``results_table.csv`` (the paper's layout) and ``summary.json``. A finished step whose params,
data files and upstream steps are unchanged is read back instead of recomputed.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json, read_jsonl, stable_hash
from ..runs import Run
from ..variants import VARIANTS, is_available, load_variant, variant_fingerprint, variant_status
from .benchmarks import BENCHMARKS, data_file, data_fingerprint, load_benchmark
from .generate import ResponseStore, generate_responses
from .items import EvalItem
from .judges import agreement_table, make_judges
from .metrics import score_item, summarize
from .paper import restored_ratio, results_table

EVAL_VERSION = 1  # bump when prompts or scoring change, so saved responses are not reused


@dataclass
class EvalResults:
    """What the evaluation step wrote, read back as tables."""

    dir: Path
    info: dict[str, Any]
    metrics: pd.DataFrame
    table: pd.DataFrame
    agreement: pd.DataFrame

    @classmethod
    def load(cls, directory: str | Path) -> "EvalResults":
        """Read the artifacts of a finished evaluation step."""
        d = Path(directory)
        return cls(d, read_json(d / "summary.json"), pd.read_csv(d / "metrics.csv", keep_default_na=False,
                                                                  na_values={"value": [""]}),
                   pd.read_csv(d / "results_table.csv"), pd.read_csv(d / "judge_agreement.csv"))

    @property
    def status(self) -> pd.DataFrame:
        """One row per variant: available, evaluated, status."""
        return pd.DataFrame(self.info["variants"])

    def responses(self) -> pd.DataFrame:
        """Every saved response (benchmark, item_id, variant, prompt, response, n_tokens)."""
        rows = [r for p in sorted((self.dir / "responses").glob("*/*.jsonl")) for r in read_jsonl(p)]
        cols = ["benchmark", "item_id", "variant", "prompt", "response", "n_tokens"]
        return pd.DataFrame(rows, columns=[*cols, "config"])[cols]

    def scores(self) -> pd.DataFrame:
        """Per-item scores: variant, benchmark, item_id, metric, judge, value."""
        return pd.DataFrame(read_jsonl(self.dir / "scores.jsonl"),
                            columns=["variant", "benchmark", "item_id", "metric", "judge", "value"])


def _free() -> None:
    """Release the memory of a model that went out of scope."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _generate(run: Run, items: dict[str, list[EvalItem]], out: Path, progress: bool
              ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[dict[str, Any]]]]]:
    """Answers of every available variant on every benchmark, and each variant's status."""
    P, status, answers = run.params, [], {}
    for st in variant_status(run):
        v = st["variant"]
        row = {"variant": v, "available": st["available"], "evaluated": False, "status": st["note"]}
        status.append(row)
        if not st["available"]:
            continue
        lm = load_variant(run, v)
        config = stable_hash({"version": EVAL_VERSION, "model": asdict(P.model), "seed": P.seed,
                              "max_new_tokens": P.eval.max_new_tokens, "variant": v,
                              "upstream": variant_fingerprint(run, v)})
        answers[v] = {b: generate_responses(lm, its, v, ResponseStore(out / "responses" / v / f"{b}.jsonl", config),
                                            P.eval.max_new_tokens, P.eval.batch_size, progress)
                      for b, its in items.items()}
        del lm
        _free()
        row.update(evaluated=True, status="evaluated")
    return status, answers


def _score(run: Run, items: dict[str, list[EvalItem]], answers: dict[str, dict[str, list[dict[str, Any]]]]
           ) -> tuple[list[dict[str, Any]], pd.DataFrame]:
    """Per-item score rows and the table of judge verdicts on refusal benchmarks."""
    E = run.params.eval
    refusal = [(v, b, r) for v, per in answers.items() for b, rows in per.items()
               if BENCHMARKS[b].kind == "refusal" for r in rows]
    verdicts: dict[str, list[bool | None]] = {}
    if refusal:
        for name, judge in make_judges(E.judges, E.llm_judge_path, run.params.model.device).items():
            verdicts[name] = judge.judge([r["prompt"] for _, _, r in refusal], [r["response"] for _, _, r in refusal])
            if hasattr(judge, "close"):
                judge.close()
        _free()
    key = {(v, b, r["item_id"]): i for i, (v, b, r) in enumerate(refusal)}
    rows = []
    for v, per in answers.items():
        for b, got in per.items():
            by_id = {it.id: it for it in items[b]}
            for r in got:
                i = key.get((v, b, r["item_id"]))
                vs = {j: verdicts[j][i] for j in verdicts} if i is not None else None
                rows += [{"variant": v, "benchmark": b, "item_id": r["item_id"], **s}
                         for s in score_item(by_id[r["item_id"]], r["response"], vs)]
    table = pd.DataFrame(verdicts, columns=list(E.judges))
    return rows, table


def evaluate(run: Run, progress: bool = True, force: bool = False) -> EvalResults:
    """Run (or reuse) the evaluation step of ``run`` and return its results."""
    P, E = run.params, run.params.eval
    items = {b: load_benchmark(b, E.data_roots, E.n_items, E.mmbench_circular) for b in E.benchmarks}
    if "llm" in E.judges and not (Path(E.llm_judge_path or "") / "config.json").is_file():
        raise FileNotFoundError(f"eval.llm_judge_path = {E.llm_judge_path!r}: not a local model folder (no config.json)")
    inputs = {"version": EVAL_VERSION, "data": {b: data_fingerprint(b, E.data_roots) for b in E.benchmarks},
              "variants": [v for v in VARIANTS if is_available(run, v)], "model": asdict(P.model), "seed": P.seed}
    if not force and run.is_done("evaluate", inputs):
        return EvalResults.load(run.step_dir("evaluate"))
    with run.step("evaluate", inputs) as out:
        status, answers = _generate(run, items, out, progress)
        rows, verdicts = _score(run, items, answers)
        atomic_write_jsonl(out / "scores.jsonl", rows)
        groups = {it.id: it.group for its in items.values() for it in its if it.group is not None}
        metrics = summarize(pd.DataFrame(rows, columns=["variant", "benchmark", "item_id", "metric", "judge",
                                                        "value"]), groups)
        atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
        agreement = agreement_table(verdicts)
        atomic_write_text(out / "judge_agreement.csv", agreement.to_csv(index=False))
        ratio = restored_ratio(run)
        table = results_table(metrics, status, P.model.name, P.pruning.method, E.judges[0], ratio)
        atomic_write_text(out / "results_table.csv", table.to_csv(index=False))
        atomic_write_json(out / "summary.json", {
            "model": P.model.name, "pruning_method": P.pruning.method, "judges": list(E.judges),
            "primary_judge": E.judges[0], "max_new_tokens": E.max_new_tokens, "restored_ratio_permyriad": ratio,
            "benchmarks": {b: {"title": BENCHMARKS[b].title, "kind": BENCHMARKS[b].kind, "n_items": len(its),
                               "file": str(data_file(b, E.data_roots))} for b, its in items.items()},
            "variants": status})
    return EvalResults.load(out)
