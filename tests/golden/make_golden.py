"""Make the golden fixtures of tests/golden/data by running the authors' released code.

This script is *not* run by the tests and imports nothing from the project. It runs in a
separate virtual environment pinned to what the released code needs (README.md beside this
file says how to make one) and reads two upstream snapshots that live outside the repository:

    python tests/golden/make_golden.py --hsr /path/to/TheShineyue/HSR \
        --sparsegpt /path/to/IST-DASLab/sparsegpt --out tests/golden/data

What it does, in order:

1. writes a small VLGuard-shaped ``train.json`` with generated images, and converts it with the
   released ``data_process/get_data.py`` (run as it is, in that folder);
2. builds two tiny LLaVA-NeXT checkpoints in code (random weights, seed fixed): ``mha`` (Llama
   text model, 4 heads, Vicuna-style template) and ``gqa`` (Llama-3-style template, 4 query heads
   over 2 KV heads, a tokenizer that adds BOS like Llama-3's);
3. runs the released Ships (``safety_head_attribution``) with eager attention and with SDPA;
4. runs the released Wanda dump (``prune_lvlm_wanda_hf`` with ``dump_wanda_score``) on the safety
   and the utility set, and the released pruning (unstructured 0.5 and 2:4);
5. runs the released realignment (``prune_lvlm_wanda_recover_heads``) for several
   (p, q, p_max, top_h) settings, one of which restores nothing, and one under 2:4;
6. runs the original SparseGPT (``SparseGPT.fasterprune``) on a fixed layer and fixed inputs.

The upstream code is copied to a temporary folder and patched there (each patch is listed in
PATCHES and in the README); nothing of it is written into the repository. Outputs are small
safetensors and JSON files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

N_UNSAFE, N_SAFE = 20, 20  # records in the synthetic train.json
N_SHIPS, N_CAL = 8, 8  # prompts for Ships, samples for each calibration set
SHIPS_SEED, CAL_SEED = 114514, 0
SETTINGS = [  # realignment settings: (name, pattern, p, q, p_max, top_h)
    ("default", "unstructured", 0.5, 0.5, 0.7, 4),
    ("wide", "unstructured", 0.3, 0.6, 0.8, 2),
    ("none", "unstructured", 0.7, 0.5, 0.7, 4),  # p = p_max: the utility band is empty, nothing restored
    ("nm", "2:4", 0.5, 0.5, 0.7, 4),
]
CASES = {"mha": dict(kv_heads=4, style="vicuna"), "gqa": dict(kv_heads=2, style="llama3")}

# (file relative to the HSR snapshot, old text, new text, why)
PATCHES = [
    ("SafetyHeadAttribution-hsr/lib/utils/custommodel.py",
     "key_states[:, head_idx, :, :] *= scale_factor",
     "key_states[:, head_idx // self.num_key_value_groups, :, :] *= scale_factor",
     "GQA: the snapshot indexes the KV heads by the query head (IndexError past H_kv); the released "
     "GQA code scales KV head g = h // group"),
    ("SafetyHeadAttribution-hsr/lib/utils/custommodel.py",
     "attn_output[:, head_idx, :, :] *= scale_factor",
     "attn_output[:, head_idx // self.num_key_value_groups, :, :] *= scale_factor",
     "GQA: the released GQA code scales the attention-output slot g instead of h (the slot bug); "
     "no change under MHA"),
    ("SafetyHeadAttribution-hsr/lib/utils/load_conv.py",
     "from fastchat.conversation import get_conv_template",
     "get_conv_template = None  # fastchat is not needed by anything this script runs",
     "the fastchat import (only load_conv, for text-only LLMs, uses it)"),
    ("alignment-attribution-hsr/lib/data.py",
     "/home/liyue/projects/hsr/psafety/dataset/VLguard/train", "@VLGUARD@",
     "hard-coded VLGuard paths"),
    ("alignment-attribution-hsr/lib/prune.py",
     "/home/liyue/psafety/LVLM_prune_safety/out/llava-next-vicuna-hf-7b/unstructured/lvlm_wanda_hf_weightonly",
     "@DUMP@", "hard-coded path of the Wanda dumps"),
    ("alignment-attribution-hsr/lib/prune.py",
     "                        head_nums = 32\n",
     "                        head_nums = model.language_model.config.num_attention_heads\n"
     "                        group = 1\n"
     "                        if name in ('self_attn.k_proj', 'self_attn.v_proj'):\n"
     "                            group = head_nums // model.language_model.config.num_key_value_heads\n"
     "                            head_nums = model.language_model.config.num_key_value_heads\n",
     "`head_nums = 32` hard-coded; GQA: k/v take the input-column band of the head's KV group, width in/H_kv"),
    ("alignment-attribution-hsr/lib/prune.py",
     "                            head_id = int(head[0].split('-')[1])\n",
     "                            head_id = int(head[0].split('-')[1]) // group\n",
     "GQA: the band of KV group g = h // group (no change under MHA, where group = 1)"),
    ("alignment-attribution-hsr/lib/prune.py",
     "                W_mask = (torch.zeros_like(W_metric1) == 1)\n"
     "                sort_res = torch.sort(W_metric1, dim=-1, stable=True)\n"
     "                indices = sort_res[1][:, : int(W_metric1.shape[1] * args.sparsity_ratio)]\n"
     "                W_mask.scatter_(1, indices, True)\n",
     "                W_mask = (torch.zeros_like(W_metric1) == 1)\n"
     "                if prune_n != 0:\n"
     "                    for ii in range(W_metric1.shape[1]):\n"
     "                        if ii % prune_m == 0:\n"
     "                            tmp = W_metric1[:, ii : (ii + prune_m)].float()\n"
     "                            W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)\n"
     "                else:\n"
     "                    sort_res = torch.sort(W_metric1, dim=-1, stable=True)\n"
     "                    indices = sort_res[1][:, : int(W_metric1.shape[1] * args.sparsity_ratio)]\n"
     "                    W_mask.scatter_(1, indices, True)\n",
     "N:M: the snapshot re-derives P unstructured; the released N:M runs re-derive it with the "
     "pruning rule's N:M branch (copied from prune_lvlm_wanda_hf in the same file)"),
]

# The snapshot has the Vicuna loader only. The Llama-3 loader of the released runs differs in two
# places (docs/fidelity.md): the text is tokenized with add_special_tokens=False, and the
# labelled span is shifted one to the left (the last prompt position kept, the final one dropped).
LLAMA3_LOADER = [
    ("input_ids = processor(text=text_prompt, images=image, return_tensors=\"pt\", padding=True)",
     "input_ids = processor(text=text_prompt, images=image, return_tensors=\"pt\", padding=True, "
     "add_special_tokens=False)"),
    ("_input_ids = processor(text=_text_prompt, images=image, return_tensors=\"pt\", padding=True)",
     "_input_ids = processor(text=_text_prompt, images=image, return_tensors=\"pt\", padding=True, "
     "add_special_tokens=False)"),
    ("        for i in range(_len):\n",
     "        labels[0][-1] = -100\n        for i in range(_len - 1):\n"),
    ("def get_VLguard_vicuna(", "def get_VLguard_llama3("),
]


# ---------------------------------------------------------------------------------------------
# 1. data

def make_vlguard(root: Path) -> None:
    """A VLGuard-shaped train.json with generated PNG images (sizes vary, so the anyres grid does)."""
    rng = np.random.default_rng(20251)
    (root / "images").mkdir(parents=True, exist_ok=True)
    words = ["how", "do", "I", "make", "a", "cake", "bomb", "steal", "paint", "this", "car", "dog", "quickly",
             "explain", "the", "picture", "hack", "phone", "garden", "write", "poem"]
    records = []
    # sizes whose anyres resize is exact: transformers 4.47.1 and 5.x resize other sizes differently
    # (e.g. 40x30 -> 43x32 vs 42x32), which changes the pixel values of the grid patches
    sizes = [(64, 32), (32, 64), (64, 64), (32, 32), (96, 48), (48, 96)]
    for i in range(N_UNSAFE + N_SAFE):
        w, h = sizes[i % len(sizes)]
        px = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        name = f"images/img_{i:03d}.png"
        Image.fromarray(px).save(root / name)
        q = " ".join(rng.choice(words, size=int(rng.integers(3, 8))))
        a = " ".join(rng.choice(words, size=int(rng.integers(4, 10))))
        if i < N_UNSAFE:
            records.append({"id": f"u{i:03d}", "image": name, "safe": False, "harmful_category": "synthetic",
                            "instr-resp": [{"instruction": q + "?", "response": "I cannot help with " + a + "."}]})
        else:
            q2 = " ".join(rng.choice(words, size=int(rng.integers(3, 8))))
            records.append({"id": f"s{i:03d}", "image": name, "safe": True,
                            "instr-resp": [{"safe_instruction": q + "?", "response": "Sure: " + a + "."},
                                           {"unsafe_instruction": q2 + "?", "response": "I cannot: " + a + "."}]})
    order = rng.permutation(len(records))  # unsafe and safe records interleaved, as in the real file
    (root / "train.json").write_text(json.dumps([records[k] for k in order], indent=1))


# ---------------------------------------------------------------------------------------------
# 2. checkpoints

TEMPLATES = {
    "vicuna": (
        "{{- 'A chat between a curious human and an artificial intelligence assistant. ' -}}"
        "{%- for m in messages -%}"
        "{%- if m.role == 'user' -%}{{- 'USER: ' -}}"
        "{%- for c in m.content -%}{%- if c.type == 'image' -%}{{ '<image>\n' }}{%- else -%}{{ c.text }}{%- endif -%}"
        "{%- endfor -%}{{- ' ' -}}"
        "{%- else -%}{{- 'ASSISTANT: ' -}}{%- for c in m.content -%}{{ c.text }}{%- endfor -%}{{- '</s>' -}}"
        "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"),
    "llama3": (
        "{{- '<|begin_of_text|>' -}}{%- for m in messages -%}"
        "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' -}}"
        "{%- for c in m.content -%}{%- if c.type == 'image' -%}{{ '<image>\n' }}{%- else -%}{{ c.text }}{%- endif -%}"
        "{%- endfor -%}{{- '<|eot_id|>' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"),
}
SPECIALS = {
    "vicuna": dict(bos="<s>", eos="</s>", pad="<unk>", extra=["<unk>", "<image>"]),
    "llama3": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                   extra=["<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>", "<image>"]),
}


def make_tokenizer(style: str):
    """Byte-level tokenizer (256 byte tokens, no merges) that adds BOS, as the real ones do."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = SPECIALS[style]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = list(dict.fromkeys([spec["bos"], spec["eos"], *spec["extra"]]))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in names])
    bos = spec["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=spec["eos"], pad_token=spec["pad"])
    hf.chat_template = TEMPLATES[style]
    return hf


def make_checkpoint(path: Path, kv_heads: int, style: str) -> None:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    torch.manual_seed(0 if style == "vicuna" else 1)
    tok = make_tokenizer(style)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                       rope_theta=500000.0 if style == "llama3" else 10000.0, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init is tiny; give the decoder weights a usable scale
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=tok.chat_template)
    model.save_pretrained(path, safe_serialization=True)
    proc.save_pretrained(path)


# ---------------------------------------------------------------------------------------------
# upstream code, copied and patched

def patched_upstream(hsr: Path, sparsegpt: Path, work: Path, vlguard: Path, dump: Path) -> Path:
    src = work / "upstream"
    shutil.copytree(hsr, src / "hsr", ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc"))
    shutil.copytree(sparsegpt, src / "sparsegpt", ignore=shutil.ignore_patterns(".git"))
    for rel, old, new, _why in PATCHES:
        f = src / "hsr" / rel
        text = f.read_text()
        if old not in text:
            raise SystemExit(f"patch does not apply to {rel}: {old[:60]!r}")
        new = new.replace("@VLGUARD@", str(vlguard)).replace("@DUMP@", str(dump))
        old = old.replace("@VLGUARD@", str(vlguard))
        f.write_text(text.replace(old, new))
    data = src / "hsr" / "alignment-attribution-hsr/lib/data.py"
    text = data.read_text()
    vic = text[text.index("def get_VLguard_vicuna("):text.index("def get_loaders(")]
    llama3 = vic
    for old, new in LLAMA3_LOADER:
        if old not in llama3:
            raise SystemExit(f"the Llama-3 loader patch does not apply: {old[:60]!r}")
        llama3 = llama3.replace(old, new)
    data.write_text(text.replace("def get_loaders(", llama3 + "def get_loaders("))
    return src


@contextlib.contextmanager
def on_path(*dirs: Path):
    old = list(sys.path)
    sys.path[:0] = [str(d) for d in dirs]
    try:
        yield
    finally:
        sys.path[:] = old
        for name in [m for m in sys.modules if m == "lib" or m.startswith("lib.")]:
            del sys.modules[name]


def quiet():
    return contextlib.redirect_stdout(io.StringIO())


def load_custom(path: Path, attn: str):
    from transformers import AutoProcessor, LlavaNextConfig

    from lib.utils.custommodel import CustomLlavaNextForConditionalGeneration

    config = LlavaNextConfig.from_pretrained(path)
    model = CustomLlavaNextForConditionalGeneration.from_pretrained(path, config=config, attn_implementation=attn,
                                                                    torch_dtype=torch.float32).eval()
    model.language_model.config._attn_implementation = attn
    model.language_model.model.config._attn_implementation = attn
    return model, AutoProcessor.from_pretrained(path)


def run_ships(src: Path, model_dir: Path, vlguard: Path, out: Path, attn: str) -> dict:
    """The released safety_head_attribution, with its model/tokenizer loaders replaced by ours
    (the released ones accept only a path containing 'vicuna' and load with the default attention)."""
    with on_path(src / "hsr" / "SafetyHeadAttribution-hsr"):
        ships = importlib.import_module("llava_next_ships")
        model, proc = load_custom(model_dir, attn)
        ships.get_tokenizer = lambda name: (proc, False)
        ships.get_model = lambda name, **kw: (model, None)
        store = out / f"ships_{attn}"
        store.mkdir(parents=True, exist_ok=True)
        with quiet():
            ships.safety_head_attribution(model_name=str(model_dir), data_path=str(vlguard / "train_unsafes.json"),
                                          imgs_path=str(vlguard), storage_path=str(store),
                                          search_cfg=ships.default_search_cfg, device="cpu", seed=SHIPS_SEED,
                                          nsamples=N_SHIPS)
        scores = json.loads((store / "train_unsafes.json_0.jsonl").read_text())
        if attn == "eager":  # the encoded prompts, for the token-level comparison
            data = ships.get_dataset(proc, str(vlguard / "train_unsafes.json"), str(vlguard), SHIPS_SEED, N_SHIPS)
            ids = [json.loads(r)["id"] for r in _sampled(vlguard / "train_unsafes.json", SHIPS_SEED, N_SHIPS)]
            tokens = [{"id": i, "input_ids": d["input_ids"][0].tolist(), "image_sizes": d["image_sizes"][0].tolist()}
                      for i, d in zip(ids, data)]
            (out / "ships_tokens.json").write_text(json.dumps(tokens))
        shutil.rmtree(store)
        del sys.modules["llava_next_ships"]
    return scores


def _sampled(path: Path, seed: int, n: int) -> list[str]:
    """The records the released loaders take (datasets' shuffle), as JSON lines."""
    import pandas as pd
    from datasets import Dataset

    ds = Dataset.from_pandas(pd.DataFrame(json.loads(path.read_text()))).shuffle(seed=seed).select(range(n))
    return [json.dumps(ds[i]) for i in range(n)]


def load_plain(path: Path):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).eval()
    model.seqlen = model.config.text_config.max_position_embeddings
    return model, AutoProcessor.from_pretrained(path)


def prune_args(**kw) -> SimpleNamespace:
    base = dict(nsamples=N_CAL, seed=CAL_SEED, disentangle=True, use_diff=False, recover_from_base=False,
                prune_part=False, neg_prune=False, use_variant=False, dump_wanda_score=False, save=None,
                sparsity_ratio=0.5, model="llava-next-vicuna-hf-7b")
    return SimpleNamespace(**{**base, **kw})


def linear_tensors(model, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for i, layer in enumerate(model.language_model.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.detach()
                out[f"layers.{i}.{name}"] = (w == 0) if what == "mask" else w.clone()
    return out


def run_pruning(src: Path, model_dir: Path, style: str, dump: Path, out: Path) -> None:
    from safetensors.torch import save_file

    with on_path(src / "hsr" / "alignment-attribution-hsr"):
        prune = importlib.import_module("lib.prune")
        data = importlib.import_module("lib.data")
        loader = data.get_VLguard_vicuna if style == "vicuna" else data.get_VLguard_llama3

        def get_loaders(name, nsamples, seed, seqlen, tokenizer, processor, disentangle, model_name, data_mode):
            return loader(nsamples, seed, seqlen, tokenizer, processor, disentangle=disentangle, data_mode=data_mode)

        prune.get_loaders = get_loaders
        # calibration tokens, as the loaders encode them
        _, proc = load_plain(model_dir)
        tokens = {}
        for mode in ("train_safes", "train_unsafes"):
            with quiet():
                batches, _ = get_loaders("VLguard", N_CAL, CAL_SEED, 0, proc.tokenizer, proc, True, "", mode)
            recs = [json.loads(r) for r in _sampled(dump.parent / "vlguard" / f"{mode.replace('train_safes', 'train_safe_safes')}.json",
                                                    CAL_SEED, N_CAL)]
            tokens[mode] = [{"id": r["id"], "input_ids": enc["input_ids"][0].tolist(),
                             "response": torch.nonzero(lab[0] != -100).squeeze(1).tolist()}
                            for r, (enc, lab) in zip(recs, batches)]
        (out / "calibration_tokens.json").write_text(json.dumps(tokens))
        # Wanda dumps on the dense model, both sets
        for mode in ("train_safes", "train_unsafes"):
            model, proc = load_plain(model_dir)
            with quiet():
                prune.prune_lvlm_wanda_hf(prune_args(dump_wanda_score=True, save=str(dump)), model, proc.tokenizer,
                                          proc, data_mode=mode, device=torch.device("cpu"), prune_data="VLguard")
            folder = dump / "0.5" / "wanda_score" / f"VLguard_{mode}_weight_only_disentangle"
            scores = {}
            for f in folder.glob("*.pkl"):
                i, name = f.name.split("_layer_")[1].split("_name_")
                name = name.split(f"_VLguard_{mode}")[0]
                scores[f"layers.{i}.{name}"] = pickle.loads(f.read_bytes()).float().contiguous()
            save_file(scores, out / f"wanda_{'utility' if mode == 'train_safes' else 'safety'}.safetensors")
        # sequential pruning, as released (on the utility set)
        for pattern, (n, m) in (("unstructured", (0, 0)), ("2:4", (2, 4))):
            model, proc = load_plain(model_dir)
            with quiet():
                prune.prune_lvlm_wanda_hf(prune_args(), model, proc.tokenizer, proc, data_mode="train_safes",
                                          device=torch.device("cpu"), prune_n=n, prune_m=m, prune_data="VLguard")
            save_file(linear_tensors(model, "mask"), out / f"pruned_{pattern.replace(':', 'of')}.safetensors")


def run_realign(src: Path, model_dir: Path, dump: Path, ships_file: Path, out: Path) -> None:
    from safetensors.torch import save_file

    with on_path(src / "hsr" / "alignment-attribution-hsr"):
        prune = importlib.import_module("lib.prune")
        for name, pattern, p, q, p_max, top_h in SETTINGS:
            n, m = (0, 0) if pattern == "unstructured" else (2, 4)
            model, proc = load_plain(model_dir)
            with quiet():
                prune.prune_lvlm_wanda_recover_heads(prune_args(), model, proc.tokenizer, proc, None,
                                                     device=torch.device("cpu"), prune_n=n, prune_m=m, p=p, q=q,
                                                     max_p=p_max, only_heads=False, top_h=top_h,
                                                     heads_paths=str(ships_file))
            save_file(linear_tensors(model, "mask"), out / f"realigned_{name}.safetensors")


def run_sparsegpt(src: Path, out: Path) -> None:
    """The original fasterprune on one fixed linear: inputs with correlated columns and a dead one."""
    from safetensors.torch import save_file

    torch.cuda.synchronize = lambda *a, **k: None  # the original syncs CUDA; this runs on the CPU
    with on_path(src / "sparsegpt"):
        mod = importlib.import_module("sparsegpt")
        g = torch.Generator().manual_seed(5)
        W = torch.randn(48, 256, generator=g)
        X = torch.randn(6, 40, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g))
        X[..., 17] = 0  # a dead input
        res = {"W": W.clone()}
        for pattern, (n, m) in (("unstructured", (0, 0)), ("2of4", (2, 4))):
            lin = torch.nn.Linear(256, 48, bias=False)
            lin.weight.data = W.clone()
            s = mod.SparseGPT(lin)
            for b in range(X.shape[0]):
                s.add_batch(X[b:b + 1], None)
            res["H"] = s.H.clone()
            with quiet():
                s.fasterprune(0.5, prunen=n, prunem=m, blocksize=128, percdamp=0.01)
            res[f"W_{pattern}"] = lin.weight.data.clone()
        del sys.modules["sparsegpt"], sys.modules["quant"]
    save_file({k: v.contiguous() for k, v in res.items()}, out / "sparsegpt.safetensors")


def upstream_commit(path: Path) -> str:
    try:
        return subprocess.run(["git", "--git-dir", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hsr", type=Path, required=True, help="a work tree of TheShineyue/HSR")
    ap.add_argument("--sparsegpt", type=Path, required=True, help="a work tree of IST-DASLab/sparsegpt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hsr-commit", default="", help="the snapshot's commit, recorded in manifest.json")
    ap.add_argument("--sparsegpt-commit", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = a.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    vlguard = out / "vlguard"
    make_vlguard(vlguard)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        conv = work / "convert"
        conv.mkdir()
        shutil.copy(vlguard / "train.json", conv / "train.json")
        with quiet():
            subprocess.run([sys.executable, str(a.hsr / "data_process" / "get_data.py")], cwd=conv, check=True,
                           stdout=subprocess.DEVNULL)
        for f in ("train_safe_safes.json", "train_safe_unsafes.json", "train_unsafes.json"):
            shutil.copy(conv / f, vlguard / f)  # the released loaders read these; the package reads train.json
        dump = work / "dump"
        src = patched_upstream(a.hsr, a.sparsegpt, work, vlguard, dump)
        (dump.parent / "vlguard").symlink_to(vlguard)
        for case, spec in CASES.items():
            d = out / case
            make_checkpoint(d / "model", spec["kv_heads"], spec["style"])
            ships = {attn: run_ships(src, d / "model", vlguard, d, attn) for attn in ("eager", "sdpa")}
            for attn, sc in ships.items():
                (d / f"ships_{attn}.json").write_text(json.dumps(sc))
            shutil.rmtree(dump, ignore_errors=True)
            run_pruning(src, d / "model", spec["style"], dump, d)
            run_realign(src, d / "model", dump, d / "ships_eager.json", d)
            print(f"{case}: done", flush=True)
        run_sparsegpt(src, out)
        for f in ("train_safe_safes.json", "train_safe_unsafes.json", "train_unsafes.json"):
            (vlguard / f).unlink()
    import transformers

    manifest = {"hsr_commit": a.hsr_commit or upstream_commit(a.hsr / ".git"),
                "sparsegpt_commit": a.sparsegpt_commit or upstream_commit(a.sparsegpt / ".git"),
                "torch": torch.__version__, "transformers": transformers.__version__,
                "n_ships": N_SHIPS, "n_calibration": N_CAL, "ships_seed": SHIPS_SEED, "calibration_seed": CAL_SEED,
                "settings": [dict(zip(("name", "pattern", "p", "q", "p_max", "top_h"), s)) for s in SETTINGS],
                "cases": CASES, "patches": [{"file": f, "why": why} for f, _o, _n, why in PATCHES]
                + [{"file": "alignment-attribution-hsr/lib/data.py", "why": "a Llama-3 loader (see LLAMA3_LOADER)"}]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
