"""``hsr export``: a variant of a finished run as an HF model folder with its card; loaded by
transformers alone (a fresh process, no hsr_lib) it answers as it did in the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from hsr_lib import export as X
from hsr_lib import model_card, steps
from hsr_lib.cli import main
from hsr_lib.io import file_hash, read_json
from hsr_lib.structure import blocks_below_n, structure_report

# ----- the structure of the sparsity (hand-computed) ------------------------------------------------


def test_blocks_below_n_counts_blocks_that_lost_zeros():
    # 2:4 on a 2x8 mask: four blocks; one full-strength (2 zeros), one with 1, one with 0, one with 3
    mask = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 0],
                         [0, 0, 0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert blocks_below_n(mask, 2, 4) == (4, 2)
    with pytest.raises(ValueError, match="blocks of 3"):
        blocks_below_n(mask, 1, 3)


def test_structure_report_per_module_type():
    masks = {"layers.0.self_attn.q_proj": torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool),
             "layers.1.self_attn.q_proj": torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool),
             "layers.0.mlp.up_proj": torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)}
    t = structure_report(masks, "2:4").set_index("module_type")
    assert t.loc["q_proj", "modules"] == 2 and t.loc["q_proj", "params"] == 16 and t.loc["q_proj", "pruned"] == 5
    assert t.loc["q_proj", "sparsity"] == 5 / 16
    assert (t.loc["q_proj", "blocks"], t.loc["q_proj", "blocks_below_n"]) == (4, 2)
    assert t.loc["q_proj", "share_below_n"] == 0.5 and t.loc["up_proj", "share_below_n"] == 0
    assert "blocks" not in structure_report(masks, "unstructured").columns


# ----- the export of the tiny library run ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(lib_run, tmp_path_factory):
    """The hsr variant of the shared tiny run, exported once: ``(run_dir, folder)``."""
    _, run_dir = lib_run
    return run_dir, X.export(run_dir, "hsr", out=tmp_path_factory.mktemp("exp") / "hsr")


def test_the_folder_holds_the_model_its_card_and_its_provenance(tiny_export):
    run_dir, out = tiny_export
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "README.md", "hsr_export.json"):
        assert (out / name).is_file(), name
    facts = read_json(out / "hsr_export.json")
    run = X.open_run(run_dir)
    res = steps.realign.load(run)
    assert facts["artifacts"]["realign"]["key"] == res.key
    marker = read_json(res.dir / "_step.json")
    assert facts["artifacts"]["realign"]["files"] == {k: v[2] for k, v in marker["files"].items()}
    assert facts["files"]["model.safetensors"] == file_hash(out / "model.safetensors")
    assert facts["environment"]["versions"]["transformers"] and facts["params"]["realign"]["q"] == run.params.realign.q
    assert facts["zero_pattern"]["pruned_not_zero"] == 0
    pruned_marker = read_json(res.pruned.dir / "_step.json")
    assert facts["base_model"]["fingerprint"] == pruned_marker["reads"]["model"]["identity"]  # the run's own identity
    assert not list(out.parent.glob(".*partial"))  # nothing left of the staging folder


def test_the_card_holds_the_runs_numbers(tiny_export):
    run_dir, out = tiny_export
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["pipeline_tag"] == "image-text-to-text" and {"pruned", "sparsity", "safety"} <= set(meta["tags"])
    assert "base_model" not in meta  # a tiny: model is no HF id; the card names it in the text
    run = X.open_run(run_dir)
    s = steps.realign.load(run).summary
    assert f"{s['restored']} of {s['decoder_linear_params']}" in text and ", ".join(s["heads"]) in text
    m = steps.evaluate.load(run).metrics
    row = next(line for line in text.splitlines() if line.startswith("| **this model**"))
    asr = m[(m.variant == "hsr") & (m.metric == "asr") & (m.judge == "vlguard")]
    assert all(f"{v:.1f}" in row for v in asr.value)
    assert "not evaluated in this run" not in text.lower() and "unstructured" in text
    assert "Li, Yue" in text and "2505.16104" in text


def test_bad_requests_are_named(lib_run, tmp_path, capsys):
    _, run_dir = lib_run
    with pytest.raises(X.ExportError, match="no params.yaml"):
        X.export(tmp_path, "hsr")
    with pytest.raises(X.ExportError, match="base checkpoint"):
        X.export(run_dir, "dense")
    with pytest.raises(X.ExportError, match="--variant 'hsr_b'"):
        X.export(run_dir, "hsr_b")
    key = steps.realign.load(X.open_run(run_dir)).key
    with pytest.raises(X.ExportError, match=f"finished realign keys there: {key}"):
        X.export(run_dir, "hsr", ["realign.q=0.25"])
    with pytest.raises(X.ExportError, match="finished realign keys there"):
        X.export(run_dir, "hsr_a")
    assert main(["export", str(run_dir), "--variant", "random_heads@7", "--out", str(tmp_path / "x")]) == 2
    assert "no finished realign step matches" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_missing_artifact_is_named_and_a_failure_leaves_nothing(run_copy, tmp_path, monkeypatch):
    run = run_copy()
    res = steps.realign.load(run)
    (res.dir / "restored.safetensors").unlink()
    with pytest.raises(X.ExportError, match="restored.safetensors is missing"):
        X.export(run.dir, "hsr", out=tmp_path / "e")
    monkeypatch.setattr(model_card, "render", lambda facts: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        X.export(run.dir, "pruned", out=tmp_path / "e")
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e*"))


def test_the_card_shows_intervals_and_over_refusal_when_the_run_has_them(run_copy):
    run = run_copy()
    ev = steps.evaluate.load(run)
    m = ev.metrics
    lines = model_card._evaluation({"evaluation": X.evaluation(X.resolve(run.dir, "hsr"))})
    over = m[(m.variant == "hsr") & (m.benchmark == "mmbench") & (m.metric == "over_refusal")].iloc[0]
    assert "over-refusal MMBench" in lines[0] and "95% intervals" in lines[-1]
    assert f"{over.value:.1f} [{over.ci_low:.1f}, {over.ci_high:.1f}]" in lines[-3]
    # an evaluation without intervals, over-refusal or combined rows (an older run): the card says so
    old = m[(m.metric != "over_refusal") & (m.benchmark != "combined")].drop(columns=["ci_low", "ci_high"])
    old.to_csv(ev.dir / "metrics.csv", index=False)
    lines = model_card._evaluation({"evaluation": X.evaluation(X.resolve(run.dir, "hsr"))})
    assert "over-refusal" not in lines[0] and "ASR combined" in lines[0] and "[" not in "".join(lines[2:5])
    assert "reports no intervals" in lines[-1] and "not measured in this run" in lines[-1]


def test_a_variant_the_run_did_not_evaluate_says_so():
    facts = {"evaluation": None}
    assert model_card._evaluation(facts)[0].startswith("Not evaluated in this run")


def test_nm_honesty_in_card_and_summary(run_copy, tmp_path):
    """After 2:4 pruning, restoring fills some blocks: the card and the summary give the share."""
    run = run_copy(**{"pruning.pattern": "2:4"})
    steps.realign.run(run, progress=False)
    out = X.export(run.dir, "hsr", ["pruning.pattern=2:4"], out=tmp_path / "nm")
    facts = read_json(out / "hsr_export.json")
    res = steps.realign.load(run)
    t = structure_report(res.mask(), "2:4").set_index("module_type")
    got = {r["module_type"]: r for r in facts["structure"]["exported"]}
    assert got["q_proj"]["blocks_below_n"] == t.loc["q_proj", "blocks_below_n"] > 0
    assert got["up_proj"]["blocks_below_n"] == 0  # MLP linears are never restored
    text = (out / "README.md").read_text()
    assert "no longer 2:4" in text and f"{100 * t.loc['q_proj', 'share_below_n']:.3f}%" in text
    assert f"q_proj: {100 * t.loc['q_proj', 'share_below_n']:.3f}% of its" in X.summary_line(out)


def test_compressed_tensors_round_trip(tiny_export, tmp_path):
    """sparse-bitmask weights, decompressed by compressed-tensors' own code, equal the plain export."""
    pytest.importorskip("compressed_tensors")
    from safetensors.torch import load_file

    from hsr_lib.compressed import bitmask_bytes, decompress

    run_dir, plain = tiny_export
    out = X.export(run_dir, "hsr", out=tmp_path / "ct", fmt="compressed-tensors")
    cfg = read_json(out / "config.json")["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["sparsity_config"]["format"] == "sparse-bitmask"
    dense = load_file(str(plain / "model.safetensors"))
    back = decompress(out)
    assert set(back) == set(dense) and all(torch.equal(back[k], dense[k]) for k in dense)
    facts = read_json(out / "hsr_export.json")["compressed"]
    assert facts["bytes_after"] == (out / "model.safetensors").stat().st_size < facts["bytes_before"]
    assert bitmask_bytes(2, 9, 5, 4) == 5 * 4 + 2 * 2 + 2 * 8


# ----- loaded elsewhere: the toy, transformers alone -------------------------------------------------

ELSEWHERE = r'''
import json, sys
import torch, transformers
from transformers import AutoImageProcessor, AutoTokenizer
from PIL import Image
from safetensors.torch import save_file

folder, items_path, out_dir = sys.argv[1:4]
config = json.load(open(f"{folder}/config.json"))
model = getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
image_processor = AutoImageProcessor.from_pretrained(folder)


class ImageOnlyProcessor(transformers.Qwen2VLProcessor):  # the Qwen2-VL processor without its video part
    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


processor = ImageOnlyProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)
tokenizer.padding_side = "left"
eos = model.generation_config.eos_token_id
eos = sorted(({eos} if isinstance(eos, int) else set(eos or [])) | {tokenizer.eos_token_id})
answers = {}
for group in json.load(open(items_path)):
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it["question"]}]}],
                                           add_generation_prompt=True, tokenize=False) for it in group["items"]]
    images = [[Image.open(it["image"]).convert("RGB")] for it in group["items"]]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=group["max_new_tokens"], do_sample=False, num_beams=1,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    for it, row in zip(group["items"], out[:, enc["input_ids"].shape[1]:].tolist()):
        n = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers[it["key"]] = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
zeros = {name: (m.weight == 0) for name, m in model.named_modules()
         if isinstance(m, torch.nn.Linear) and ".language_model.layers." in name}
save_file(zeros, f"{out_dir}/zeros.safetensors")
json.dump({"answers": answers, "hsr_lib_imported": any(k.startswith("hsr_lib") for k in sys.modules)},
          open(f"{out_dir}/answers.json", "w"))
'''


@pytest.mark.slow
def test_the_toy_export_loads_elsewhere_and_answers_as_in_the_run(toy_story, tmp_path):
    from safetensors.torch import load_file

    from hsr_lib.evaluate.benchmarks import load_benchmark
    from hsr_lib.toy_model import SHIPPED

    run = toy_story[0]
    out = X.export(run.dir, "hsr", out=tmp_path / "toy-hsr")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    video = read_json(out / "video_preprocessor_config.json")
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor" and video["patch_size"] == 14
    from transformers.models.auto.video_processing_auto import get_video_processor_config

    assert get_video_processor_config(str(out)) == video  # what AutoProcessor reads where torchvision exists
    # 30 test items (10 each of three benchmarks) and the answers the run saved for them
    ev = steps.evaluate.load(run)
    saved = ev.responses()
    saved = saved[saved.variant == "hsr"]
    P = run.params
    groups, expected = [], {}
    for b in ("toy_harmful", "toy_harmful_novel", "toy_benign"):
        items = load_benchmark(b, P.eval.data_roots, P.eval.n_items)[:10]
        group = []
        for it in items:
            path = tmp_path / f"{b}-{it.id}.png"
            it.load_image().save(path)
            key = f"{b}/{it.id}"
            group.append({"key": key, "question": it.question, "image": str(path)})
            expected[key] = saved[(saved.benchmark == b) & (saved.item_id == it.id)].response.iloc[0]
        groups.append({"items": group, "max_new_tokens": P.eval.max_new_tokens})
    (tmp_path / "items.json").write_text(json.dumps(groups))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", ELSEWHERE, str(out), str(tmp_path / "items.json"), str(tmp_path)],
                          cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = read_json(tmp_path / "answers.json")
    assert not got["hsr_lib_imported"]
    assert len(got["answers"]) == 30 and got["answers"] == expected
    zeros = load_file(str(tmp_path / "zeros.safetensors"))
    mask = steps.realign.load(run).mask()
    assert len(zeros) == len(mask)
    for name, m in mask.items():
        assert torch.equal(zeros[f"model.language_model.{name}"], m), name
    text = (out / "README.md").read_text()
    assert "license: mit" in text and "base_model:" not in text.split("---")[1]


def test_cli_export_prints_where_and_what(tiny_export, tmp_path, capsys):
    run_dir, _ = tiny_export
    assert main(["export", str(run_dir), "--variant", "pruned", "--out", str(tmp_path / "p")]) == 0
    said = capsys.readouterr().out
    assert f"pruned -> {tmp_path / 'p'}" in said and "unstructured" in said
    assert "Realignment:** none" in (tmp_path / "p" / "README.md").read_text()
    shutil.rmtree(tmp_path / "p")
