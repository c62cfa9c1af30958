"""Evaluation (notebook 06, docs/method.md): greedy generation, refusal judges, SafeBench / Ch3Ef /
MMBench / DocVQA / VLGuard in their real formats, ASR, utility and RSR.

Modules: ``items`` (EvalItem), ``benchmarks`` (loaders), ``figstep`` (typographic images),
``choices`` (multiple-choice prompts and answer parsing), ``generate`` (batched greedy decoding,
resumable JSONL), ``judges`` and ``llm_judge`` (refusal judges), ``metrics`` (ANLS, ASR, RSR),
``paper`` (the paper's table and ours). The step that evaluates a run is :mod:`hsr_lib.steps.evaluate`.
"""

from .benchmarks import BENCHMARKS, BenchmarkError, load_benchmark
from .items import EvalItem
from .judges import KEYWORD_JUDGES, agreement_table, make_judges
from .metrics import anls, rsr

__all__ = ["BENCHMARKS", "BenchmarkError", "EvalItem", "KEYWORD_JUDGES", "agreement_table", "anls",
           "load_benchmark", "make_judges", "rsr"]
