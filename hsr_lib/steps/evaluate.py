"""The evaluation step (notebook 06): generate with every variant ``eval.variants`` names on every
benchmark, judge, score and tabulate (docs/method.md).

Answers are keyed by what they depend on, ``evaluate/responses/<variant>-<hash>/<benchmark>.jsonl``
(resumable; shared by every evaluation that needs that variant with the same generation
settings), so adding a variant generates only for it. The tables go to
``evaluate/eval-<hash>/``: ``scores.jsonl`` (one row per item, metric and judge), ``metrics.csv``
(benchmark-level, in %, with 95% intervals; benchmark ``combined``: the combined ASR, pooled
over-refusal and RSR), ``paired_tests.csv`` (variants compared on the same items),
``over_refusal_by_phrasing.csv`` (the toy's benign set), ``judge_agreement.csv``,
``results_table.csv`` (the paper's layout) and ``summary.json``.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..evaluate.benchmarks import BENCHMARKS, data_file, data_fingerprint, load_benchmark
from ..evaluate.generate import ResponseStore, generate_responses
from ..evaluate.items import EvalItem
from ..evaluate.judges import agreement_table, make_judges
from ..evaluate import comparisons as C
from ..evaluate.metrics import over_refusal_judge, read_metrics, score_item, summarize
from ..evaluate.paper import results_table
from ..identity import folder_fingerprint
from ..io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_jsonl, stable_hash
from ..params import Params
from ..runs import Run, Spec
from . import variants as V
from .base import Result, ensure, finished, model_reads

NAME = "evaluate"
EVAL_VERSION = 1  # bump when prompts or scoring change, so saved responses are not reused
SCORING_VERSION = 2  # bump when the tables change but the answers do not (2: over-refusal, intervals, tests)
SCORE_COLUMNS = ["variant", "benchmark", "item_id", "metric", "judge", "value"]


@dataclass
class EvalResults(Result):
    """What the evaluation step wrote, read back as tables."""

    responses_dirs: dict[str, Path] | None = None

    @property
    def info(self) -> dict[str, Any]:
        return self.summary

    @property
    def metrics(self) -> pd.DataFrame:
        """Benchmark-level metrics in %: variant, benchmark, metric, judge, value, ci_low, ci_high (+ n)."""
        return read_metrics(self.dir / "metrics.csv")

    @property
    def paired_tests(self) -> pd.DataFrame:
        """Variants compared on the same items: rates, difference with its interval, McNemar's p."""
        return pd.read_csv(self.dir / "paired_tests.csv", keep_default_na=False,
                           na_values={c: [""] for c in C.PAIRED_COLUMNS if c not in ("judge", "comparison")})

    @property
    def over_refusal_by_phrasing(self) -> pd.DataFrame | None:
        """The toy's over-refusal per benign phrasing and variant (None when the toy was not evaluated)."""
        path = self.dir / "over_refusal_by_phrasing.csv"
        return pd.read_csv(path) if path.is_file() else None

    @property
    def table(self) -> pd.DataFrame:
        """This run's rows in the paper's main-table layout."""
        return pd.read_csv(self.dir / "results_table.csv")

    @property
    def agreement(self) -> pd.DataFrame:
        return pd.read_csv(self.dir / "judge_agreement.csv")

    @property
    def status(self) -> pd.DataFrame:
        """One row per variant: where it came from and whether it was evaluated."""
        return pd.DataFrame(self.summary["variants"])

    def responses(self) -> pd.DataFrame:
        """Every response of the evaluated variants (benchmark, item_id, variant, prompt, response, n_tokens)."""
        rows = [r for d in (self.responses_dirs or {}).values() for p in sorted(d.glob("*.jsonl")) for r in read_jsonl(p)]
        cols = ["benchmark", "item_id", "variant", "prompt", "response", "n_tokens"]
        return pd.DataFrame(rows, columns=[*cols, "config"])[cols]

    def scores(self) -> pd.DataFrame:
        """Per-item scores: variant, benchmark, item_id, metric, judge, value."""
        return pd.DataFrame(read_jsonl(self.dir / "scores.jsonl"), columns=SCORE_COLUMNS)


def _generation(P: Params) -> dict[str, Any]:
    E = P.eval
    return {"version": EVAL_VERSION, "max_new_tokens": E.max_new_tokens, "batch_size": E.batch_size}


def _responses_config(P: Params, variant: str) -> str:
    """What a variant's answers depend on: its weights and the generation's settings."""
    return stable_hash({"variant": V.fingerprint(P, variant), "generation": _generation(P)})


def responses_key(P: Params, variant: str) -> str:
    """The folder of a variant's answers: its name and :func:`_responses_config`."""
    return f"{V.label(variant)}-{_responses_config(P, variant)[:10]}"


def _judge_fingerprint(P: Params) -> str | None:
    """The LLM judge by content (its weight, config and tokenizer files), not by where it lies."""
    path = Path(P.eval.llm_judge_path or "") / "config.json"
    return folder_fingerprint(path.parent) if "llm" in P.eval.judges and path.is_file() else None


def spec(P: Params) -> Spec:
    """The evaluation's key: the variants (through their artifacts), benchmarks, judges and generation."""
    E = P.eval
    reads = {"model": model_reads(P), "generation": _generation(P), "variants": list(E.variants),
             "judges": list(E.judges), "llm_judge": _judge_fingerprint(P), "n_items": E.n_items,
             "scoring": SCORING_VERSION,
             "mmbench_circular": E.mmbench_circular,
             "data": {b: data_fingerprint(b, E.data_roots) for b in E.benchmarks}}
    upstream = tuple(s for v in E.variants if (s := V.variant_spec(P, v)) is not None)
    return Spec(NAME, "eval", reads, upstream=upstream, params=P, runner=run)


def _dirs(run: Run) -> dict[str, Path]:
    return {v: run.dir / NAME / "responses" / responses_key(run.params, v) for v in run.params.eval.variants}


def load(run: Run) -> EvalResults:
    """The finished evaluation of ``run``'s params."""
    s = spec(run.params)
    d, summary = finished(run, s, "evaluation")
    return EvalResults(d, s.key, summary, _dirs(run))


def _free() -> None:
    """Release the memory of a model that went out of scope."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def _generate(run: Run, items: dict[str, list[EvalItem]], progress: bool
              ) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[dict[str, Any]]]]]:
    """Answers of every variant on every benchmark, and where each variant came from."""
    P, status, answers = run.params, [], {}
    dirs = _dirs(run)
    for v in P.eval.variants:
        s = V.variant_spec(P, v)
        lm = V.load_variant(run, v, upstream="refuse")
        config = _responses_config(P, v)
        answers[v] = {b: generate_responses(lm, its, v, ResponseStore(dirs[v] / f"{b}.jsonl", config),
                                            P.eval.max_new_tokens, P.eval.batch_size, progress)
                      for b, its in items.items()}
        del lm
        _free()
        status.append({"variant": v, "from": "the params' model" if s is None else s.where,
                       "restored_ratio_permyriad": V.restored_ratio(run, v), "evaluated": True,
                       "responses": str(dirs[v].relative_to(run.dir))})
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
    refusal_judge = over_refusal_judge(E.judges)
    rows = []
    for v, per in answers.items():
        for b, got in per.items():
            by_id = {it.id: it for it in items[b]}
            for r in got:
                i = key.get((v, b, r["item_id"]))
                vs = {j: verdicts[j][i] for j in verdicts} if i is not None else None
                rows += [{"variant": v, "benchmark": b, "item_id": r["item_id"], **x}
                         for x in score_item(by_id[r["item_id"]], r["response"], vs, refusal_judge)]
    return rows, pd.DataFrame(verdicts, columns=list(E.judges))


def _write_metrics(out: Path, scores: pd.DataFrame, items: dict[str, list[EvalItem]], groups: dict[str, str],
                   P: Params) -> pd.DataFrame:
    """``metrics.csv`` (per benchmark and combined, with intervals), ``paired_tests.csv`` and, for the
    toy, ``over_refusal_by_phrasing.csv``; returns the metrics."""
    E = P.eval
    judge, refuser = E.judges[0], over_refusal_judge(E.judges).name
    variants, benches = list(E.variants), list(items)
    metrics = pd.concat([summarize(scores, groups), C.combined_rows(scores, benches, variants, judge, refuser)],
                        ignore_index=True)
    atomic_write_text(out / "metrics.csv", metrics.to_csv(index=False))
    tests = C.paired_tests(scores, benches, variants, judge, refuser)
    atomic_write_text(out / "paired_tests.csv", tests.to_csv(index=False))
    if "toy_benign" in items:
        questions = {it.id: it.question for it in items["toy_benign"]}
        table = C.over_refusal_by_phrasing(scores, questions, "toy_benign", refuser)
        atomic_write_text(out / "over_refusal_by_phrasing.csv", table.to_csv(index=False))
    return metrics


def run(run: Run, *, upstream: str = "compute", progress: bool = True) -> EvalResults:
    """Evaluate (or reuse the evaluation of) every variant of ``run``'s params."""
    P, E = run.params, run.params.eval
    items = {b: load_benchmark(b, E.data_roots, E.n_items, E.mmbench_circular, P.data.allow_outside_root)
             for b in E.benchmarks}
    if "llm" in E.judges and not (Path(E.llm_judge_path or "") / "config.json").is_file():
        raise FileNotFoundError(f"eval.llm_judge_path = {E.llm_judge_path!r}: not a local model folder (no config.json)")
    s = spec(P)
    ensure(run, s.upstream, upstream, progress)
    if run.is_done(s):
        return load(run)
    with run.step(s) as out:
        status, answers = _generate(run, items, progress)
        rows, verdicts = _score(run, items, answers)
        atomic_write_jsonl(out / "scores.jsonl", rows)
        groups = {it.id: it.group for its in items.values() for it in its if it.group is not None}
        metrics = _write_metrics(out, pd.DataFrame(rows, columns=SCORE_COLUMNS), items, groups, P)
        atomic_write_text(out / "judge_agreement.csv", agreement_table(verdicts).to_csv(index=False))
        table = results_table(metrics, status, P.model.name, P.pruning.method, E.judges[0])
        atomic_write_text(out / "results_table.csv", table.to_csv(index=False))
        atomic_write_json(out / "summary.json", {
            "model": P.model.name, "pruning_method": P.pruning.method, "judges": list(E.judges),
            "primary_judge": E.judges[0], "over_refusal_judge": over_refusal_judge(E.judges).name,
            "combined": dict(zip(("benchmarks", "rule"), C.safety_sets(list(items)))),
            "max_new_tokens": E.max_new_tokens,
            "benchmarks": {b: {"title": BENCHMARKS[b].title, "kind": BENCHMARKS[b].kind, "n_items": len(its),
                               "file": str(data_file(b, E.data_roots))} for b, its in items.items()},
            "variants": status})
    return load(run)
