"""The model card (README.md, Hugging Face format) of an exported variant: YAML front matter, then
what was done in plain words. :func:`render` writes only what the export's facts hold (read from
the run's artifacts by :func:`hsr_lib.export.collect`); nothing in it is typed in."""

from __future__ import annotations

from typing import Any

import yaml

from .params import parse_variant

PAPER = ("Hierarchical Safety Realignment: Lightweight Restoration of Safety in Pruned Large "
         "Vision-Language Models")
ARXIV = "2505.16104"
CITATION = """@inproceedings{li2025hsr,
  title     = {Hierarchical Safety Realignment: Lightweight Restoration of Safety in Pruned Large Vision-Language Models},
  author    = {Li, Yue and Yi, Xin and Shi, Dongsheng and de Melo, Gerard and Wang, Xiaoling and Wang, Linlin},
  booktitle = {Findings of the Association for Computational Linguistics: ACL 2025},
  year      = {2025},
  address   = {Vienna, Austria},
  publisher = {Association for Computational Linguistics},
  pages     = {7600--7612},
  doi       = {10.18653/v1/2025.findings-acl.394},
  eprint    = {2505.16104},
  archivePrefix = {arXiv}
}"""
VARIANT_WORDS = {
    "pruned": "the pruned model, without realignment",
    "hsr": "HSR: inside the top Ships heads, the pruned weights important for safety and only moderately "
           "important for utility are restored to their dense values",
    "hsr_a": "HSR-a: inside the top Ships heads, every pruned weight of the heads' region is restored",
    "random_heads": "the control: the same restoring as HSR, inside heads drawn at random",
}
SHIPS_WORDS = {"kl": "KL divergence of the next-token distribution", "subspace": "subspace distance",
               "hidden0_angle": "angle of the first hidden state (the released code)"}


def front_matter(facts: dict[str, Any]) -> dict[str, Any]:
    """``base_model`` (an HF id only), ``tags``, ``license`` (when known), ``pipeline_tag``, ``library_name``."""
    base = facts["base_model"]
    meta: dict[str, Any] = {}
    if base.get("hf_id"):
        meta["base_model"] = base["hf_id"]
    if base.get("license"):
        meta["license"] = base["license"]
    tags = ["pruned", "sparsity", "safety", "hsr", facts["pruning"]["method"], "vision-language"]
    if facts["kind"] != "pruned":
        tags.append("safety-realignment")
    if facts.get("weights_format") == "compressed-tensors":
        tags.append("compressed-tensors")
    meta["tags"] = tags
    meta["pipeline_tag"] = "image-text-to-text"
    meta["library_name"] = "transformers"
    return meta


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(c: dict[str, Any] | None) -> str:
    """'12.0 [8.1, 17.2]' (value and interval in %) or '12.0'; '–' when absent."""
    if not c or c.get("value") is None:
        return "–"
    s = _pct(c["value"])
    if c.get("ci_low") is not None and c.get("ci_high") is not None:
        s += f" [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]"
    return s


def _base_words(facts: dict[str, Any]) -> str:
    b = facts["base_model"]
    if b["kind"] == "hf":
        return f"[{b['name']}](https://huggingface.co/{b['name']})"
    if b["kind"] == "toy":
        return (f"the hsr package's teaching toy `{b['name']}` (a small Qwen2-VL-architecture model trained on a "
                "generated shapes-and-refusals task; not a real assistant)")
    if b["kind"] == "tiny":
        return f"`{b['name']}`, a random-weight test model of the hsr package (its answers mean nothing)"
    return f"a local checkpoint (`{b['name']}`; its file hashes are in `hsr_export.json`)"


def _what_was_done(facts: dict[str, Any]) -> list[str]:
    pr, re_ = facts["pruning"], facts["realign"]
    lines = [f"- **Base model:** {_base_words(facts)}.",
             f"- **Pruning:** {pr['method']} at sparsity {pr['sparsity']:g}, pattern {pr['pattern']}, calibrated on "
             f"{pr['n_samples']} utility samples; the pruned model reached {_pct(100 * pr['sparsity_reached'], 2)}% "
             "sparsity over the language model's decoder linears."]
    if re_ is None:
        lines.append("- **Realignment:** none (this is the pruned model).")
    else:
        kind = parse_variant(facts["variant"])[0]
        if re_.get("ships_score"):
            heads = (f"the top {re_['top_h']} by Ships score `{re_['ships_score']}` "
                     f"({SHIPS_WORDS.get(re_['ships_score'], re_['ships_score'])})")
        else:
            heads = f"{re_['top_h']} heads drawn at random (seed {re_['seed']})"
        lines += [f"- **Realignment:** {VARIANT_WORDS[kind]}.",
                  f"- **Heads:** {heads}; as layer-head: {', '.join(re_['heads'])}.",
                  f"- **Settings:** p = {re_['p']:g}, q = {re_['q']:g}, p_max = {re_['p_max']:g}, "
                  f"top_h = {re_['top_h']}; head region `{re_['region']}`, base mask `{re_['base_mask']}`.",
                  f"- **Restored weights:** {re_['restored']} of {re_['decoder_linear_params']} decoder linear "
                  f"parameters, {re_['restored_ratio_permyriad']:.4g} ‱ ({re_['newly_nonzero']} of them were zero "
                  "in the pruned model)."]
    lines.append(f"- **Fidelity mode:** `{facts['fidelity']}` ("
                 + ("the paper's text" if facts["fidelity"] == "paper" else "the authors' released code")
                 + "; the hsr package's docs/fidelity.md lists every difference).")
    return lines


def _structure_table(facts: dict[str, Any]) -> list[str]:
    st = facts["structure"]
    nm = st["pattern"] != "unstructured"
    pruned = {r["module_type"]: r for r in st["pruned"]}
    head = "| module type | modules | parameters | sparsity, pruned model | sparsity, this model |"
    sep = "|---|---:|---:|---:|---:|"
    if nm:
        head += f" M-blocks with fewer than N zeros ({st['pattern']}) |"
        sep += "---:|"
    rows = [head, sep]
    for r in st["exported"]:
        p = pruned.get(r["module_type"], r)
        line = (f"| {r['module_type']} | {r['modules']} | {r['params']} | {100 * p['sparsity']:.2f}% | "
                f"{100 * r['sparsity']:.2f}% |")
        if nm:
            line += f" {r['blocks_below_n']} of {r['blocks']} ({100 * r['share_below_n']:.3f}%) |"
        rows.append(line)
    return rows


def _nm_words(facts: dict[str, Any]) -> str:
    st = facts["structure"]
    if st["pattern"] == "unstructured":
        return "The pruning is unstructured, so there is no N:M structure to keep or lose."
    n, m = st["pattern"].split(":")
    broken = [r for r in st["exported"] if r["blocks_below_n"]]
    if not broken:
        return (f"Every block of {m} consecutive inputs still holds at least {n} zeros: the model is still "
                f"{st['pattern']} and keeps the hardware speedup of that pattern.")
    parts = ", ".join(f"{r['module_type']} {100 * r['share_below_n']:.3f}%" for r in broken)
    return (f"**This model is no longer {st['pattern']} everywhere.** Restoring put dense values back into blocks "
            f"that held exactly {n} zeros, so some blocks of {m} now hold fewer than {n} zeros "
            f"(share of blocks, per module type: {parts}). Sparse {st['pattern']} kernels cannot run those "
            f"matrices as they are; the speedup of the pattern is lost there unless the restored weights are "
            "dropped again.")


def _title(ev: dict[str, Any], b: str) -> str:
    return "all benign sets" if b == "combined" else ev["benchmarks"].get(b, {}).get("title", b)


def _evaluation(facts: dict[str, Any]) -> list[str]:
    """The run's evaluation table (dense, pruned, this model) and a paragraph saying what it shows."""
    ev = facts["evaluation"]
    if ev is None:
        return ["Not evaluated in this run: the run's evaluation did not include this variant. "
                "Add it to `eval.variants` and run notebook 06 (`hsr run … --from 06`), then export again."]
    benches = ev["benchmarks"]
    rows = ev["rows"]
    safety = [b for b in benches if any(b in r["asr"] for r in rows)]
    combined = len(safety) > 1 and any(r.get("asr_combined") for r in rows)
    util = sorted({k for r in rows for k in r["utility"]}, key=lambda k: list(benches).index(k.split(" ")[0]))
    over = [b for b in benches if any(b in r["over_refusal"] for r in rows)]
    if len(over) > 1 and any("combined" in r["over_refusal"] for r in rows):
        over.append("combined")  # pooled over several benign sets (with one, it would repeat that set)
    cols = ([f"ASR {_title(ev, b)}" for b in safety] + (["ASR combined"] if combined else [])
            + [f"{_title(ev, k.split(' ')[0])} {k.split(' ', 1)[1].replace('_', ' ')}" for k in util]
            + [f"over-refusal {_title(ev, b)}" for b in over])
    out = ["| model | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = [_cell(r["asr"].get(b)) for b in safety]
        if combined:
            cells.append(_cell(r.get("asr_combined")))
        cells += [_cell(r["utility"].get(k)) for k in util] + [_cell(r["over_refusal"].get(b)) for b in over]
        name = r["role"] if r["role"] != "this model" else f"**this model** (`{r['variant']}`)"
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    how = ev.get("combined_how", "pooled")
    sets = ", ".join(_title(ev, b) for b in ev.get("combined_over", safety))
    notes = [f"All values in %, from the run's evaluation `evaluate/{ev['key']}` (greedy decoding; refusal judged "
             f"by the run's primary judge, `{ev['primary_judge']}`). ASR: attack success rate, the share of harmful "
             "inputs answered rather than refused (lower is safer)."]
    if combined:
        notes.append(f"ASR combined: {'the mean of' if how == 'mean' else 'the items pooled over'} {sets}.")
    if over:
        notes.append("Over-refusal: the share of benign inputs the refusal judge calls a refusal (lower is better).")
    else:
        notes.append("Over-refusal (benign inputs refused) was not measured in this run.")
    notes.append("Brackets: 95% intervals (Wilson for a rate, a seeded paired bootstrap for RSR)." if ev["intervals"]
                 else "This run's evaluation reports no intervals.")
    r = ev.get("rsr")
    if r is not None and r.get("value") is not None:
        notes.append(f"Safety restoration rate RSR = (ASR pruned − ASR this model) / (ASR pruned − ASR dense) = "
                     f"{_cell(r)}% on the combined ASR.")
    return out + [""] + [" ".join(notes)]


def _load_snippet(facts: dict[str, Any]) -> list[str]:
    arch = facts.get("architecture") or "AutoModelForImageTextToText"
    return ["```python",
            "import transformers",
            "from transformers import AutoImageProcessor, AutoTokenizer",
            "",
            'path = "."  # this folder',
            f"model = transformers.{arch}.from_pretrained(path)",
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            "image_processor = AutoImageProcessor.from_pretrained(path)",
            "```",
            "",
            "With torchvision installed, `transformers.AutoProcessor.from_pretrained(path)` gives the whole "
            "processor; without it, the hsr docs (docs/using-the-model.md) show the few lines that build the "
            "processor without its video part."]


def _format_words(facts: dict[str, Any]) -> list[str]:
    c = facts.get("compressed")
    if not c:
        return []
    return ["## Weights format", "",
            f"The pruned decoder linears ({c['modules']} matrices) are stored in compressed-tensors' "
            f"`{c['format']}` format (compressed-tensors {c['compressed_tensors']}): non-zero values, a bit mask and "
            f"row offsets. The weight files take {c['bytes_after'] / 1e6:.2f} MB instead of "
            f"{c['bytes_before'] / 1e6:.2f} MB as plain safetensors; `config.json`'s `quantization_config` tells "
            "readers how to decompress them. Note: transformers 5 loads compressed-tensors checkpoints only with "
            "compressed-tensors ≥ 0.15, which no longer reads sparse-bitmask; decompress with compressed-tensors "
            "< 0.14 first (hsr's `hsr_lib.compressed.decompress`), or export the plain safetensors format.", ""]


def render(facts: dict[str, Any]) -> str:
    """The model card (README.md) of an export."""
    kind = parse_variant(facts["variant"])[0]
    pr = facts["pruning"]
    what = "pruned" if kind == "pruned" else "pruned and safety-realigned (HSR)"
    title = f"{facts['base_model']['name']}, {what}: {pr['method']} {pr['sparsity']:g} {pr['pattern']}"
    env = facts["environment"]
    run_env = facts.get("run_environment") or {}
    lines = ["---", yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {title}", "",
             f"This folder holds the `{facts['variant']}` variant of a run of hsr, a reproduction of "
             f"[Hierarchical Safety Realignment](https://arxiv.org/abs/{ARXIV}): the base model below, pruned with "
             f"{pr['method']}"
             + ("" if kind == "pruned" else ", then realigned with HSR (Li et al., 2025), which restores a few "
                "pruned weights inside the attention heads that matter most for safety")
             + ". It is an ordinary Hugging Face model folder: transformers loads it without the hsr package.", "",
             "## What was done", "", *_what_was_done(facts), "",
             "## Sparsity per module type", "",
             "Share of zeroed weights in the language model's decoder linears (the vision tower and the "
             "embeddings are dense).", "", *_structure_table(facts), "",
             "## N:M structure", "", _nm_words(facts), "",
             "## Evaluation in this run", "", *_evaluation(facts), "",
             "## Loading", "", *_load_snippet(facts), "",
             *_format_words(facts),
             "## Provenance", "",
             f"Exported by hsr {env['versions'].get('hsr') or '(version unknown)'} at commit "
             f"`{env.get('git_commit') or 'unknown'}` with transformers {env['versions'].get('transformers')} and "
             f"torch {env['versions'].get('torch')}; the run's steps were computed at commit "
             f"`{run_env.get('git_commit') or 'unknown'}`. `hsr_export.json` beside this card holds the run's "
             "params, the keys and content hashes of every artifact this model was rebuilt from, the base model's "
             "identity and the package versions.", "",
             "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)
