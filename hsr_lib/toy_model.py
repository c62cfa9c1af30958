"""The teaching toy's model (docs/toy.md): a Qwen2-VL-architecture VLM small enough to train on a
laptop CPU in one to two minutes, its word-level tokenizer and chat template, the training loop,
and where checkpoints live.

``toy:qwen2_vl`` is the shipped checkpoint (package data, ``hsr_lib/toy_assets/model``);
``toy:qwen2_vl-s<seed>`` is the same recipe with another training seed, and ``toy:qwen2_vl-mha``
(``-mha-s<seed>``) the same with multi-head attention (4 KV heads) instead of GQA; those are
trained on first use and cached under ``$HSR_CACHE`` (default ``~/.cache/hsr``). Training runs with one thread and a fixed
seed, so it is bitwise repeatable on one machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import toy_world as W

ASSETS = Path(__file__).resolve().parent / "toy_assets"
SHIPPED = ASSETS / "model"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "[UNK]"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATE = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m.role + ' ' -}}"
    "{%- if m.content is string -%}{{- m.content -}}{%- else -%}{%- for c in m.content -%}"
    "{%- if c.type == 'image' -%}{{- '" + IMAGE + " ' -}}{%- elif c.type == 'text' -%}{{- c.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- '<|im_end|> ' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant ' -}}{%- endif -%}"
)
_NAME = re.compile(r"toy:qwen2_vl(-mha)?(?:-s(\d+))?")
SHIPPED_SEED = 2  # the seed of the shipped checkpoint: the rule in docs/toy.md picked it (its card says so too)


@dataclass(frozen=True)
class Recipe:
    """How the toy is trained: AdamW with decoupled weight decay, warm-up then cosine, fp32, loss on
    the response only, one thread."""

    seed: int = 0
    steps: int = 1000  # 600 left circle and square confused (dense benign accuracy 57%)
    batch: int = 32
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.1  # 1.0 kept fewer of the features that tell a circle from a square
    warmup: int = 30
    clip: float = 1.0
    kv_heads: int = 2  # 2: grouped-query attention (the shipped toy); 4: multi-head attention
    n_benign: int = 6000  # more distinct images, each seen about 5 times rather than 10: less memorised
    n_harmful: int = 60  # safety data stays rare (1%): that is what makes the toy's refusal fragile
    n_unsafe: int = 30


def make_processor():
    """The toy's processor: word-level tokenizer (every word of the toy world), Qwen2-VL's image
    processor at 56×56 (4 image tokens), the minimal chat template above."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from .processors import image_only_processor

    vocab = {w: i for i, w in enumerate(SPECIALS + W.words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 unk_token="[UNK]")
    hf.chat_template = TEMPLATE
    ip = Qwen2VLImageProcessorPil(min_pixels=W.SIZE * W.SIZE, max_pixels=W.SIZE * W.SIZE)
    return image_only_processor(Qwen2VLProcessor)(ip, hf, chat_template=TEMPLATE)


def make_config(tok, kv_heads: int = 2):
    """Qwen2-VL: text hidden 64, 4 layers, 4 heads, 2 KV heads (or 4), intermediate 128, M-RoPE
    [2, 3, 3]; vision depth 2, embed 64, 4 heads."""
    from transformers import Qwen2VLConfig

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in dict(
        image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>").items()}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512, bos_token_id=None,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def _encode(processor, ex: W.Example) -> dict:
    """One training conversation: token ids, the first response position, image patches and grid."""
    from .prompts import conversation_text, prompt_text

    text, prompt = conversation_text(processor, ex.question, ex.answer), prompt_text(processor, ex.question)
    full = processor(text=[text], images=[[ex.image]], return_tensors="pt")
    if not text.startswith(prompt):
        raise ValueError(f"the toy's chat template: the conversation does not start with its prompt ({ex.id})")
    # the word-level tokenizer splits on whitespace: the response is the tokens of the text after the prompt
    n_prompt = len(full["input_ids"][0]) - len(processor.tokenizer(text[len(prompt):], add_special_tokens=False)["input_ids"])
    return {"ids": full["input_ids"][0], "mm": full["mm_token_type_ids"][0], "start": n_prompt,
            "pixels": full["pixel_values"], "grid": full["image_grid_thw"]}


def _collate(items: list[dict], pad: int) -> dict:
    """Left-padded batch; labels only at response positions (the answer and its end token)."""
    n = max(len(x["ids"]) for x in items)
    ids = torch.full((len(items), n), pad, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    mm = torch.zeros((len(items), n), dtype=torch.long)
    for b, x in enumerate(items):
        off = n - len(x["ids"])
        ids[b, off:], mask[b, off:], mm[b, off:] = x["ids"], 1, x["mm"]
        labels[b, off + x["start"]:] = x["ids"][x["start"]:]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "mm_token_type_ids": mm,
            "pixel_values": torch.cat([x["pixels"] for x in items]), "image_grid_thw": torch.cat([x["grid"] for x in items])}


def train(recipe: Recipe = Recipe(), out: str | os.PathLike | None = None, progress: bool = True):
    """Train the toy with ``recipe`` (one thread: bitwise repeatable); save it to ``out`` if given.
    Returns ``(model, processor, card)``."""
    from transformers import Qwen2VLForConditionalGeneration

    from .progress import maybe

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        processor = make_processor()
        data = [_encode(processor, ex) for ex in W.train_set(recipe.seed, recipe.n_benign, recipe.n_harmful,
                                                              recipe.n_unsafe)]
        torch.manual_seed(recipe.seed)
        model = Qwen2VLForConditionalGeneration(make_config(processor.tokenizer, recipe.kv_heads)).float().train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas,
                                weight_decay=recipe.weight_decay)

        def lr_at(step: int) -> float:
            if step < recipe.warmup:
                return (step + 1) / recipe.warmup
            return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        g = torch.Generator().manual_seed(recipe.seed)
        order: list[int] = []
        losses = []
        for step in maybe(range(recipe.steps), progress, desc="train toy"):
            if len(order) < recipe.batch:
                order += torch.randperm(len(data), generator=g).tolist()
            idx, order = order[:recipe.batch], order[recipe.batch:]
            batch = _collate([data[i] for i in idx], processor.tokenizer.pad_token_id)
            loss = model(**batch, use_cache=False).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        model.eval()
        card = {"recipe": asdict(recipe), "train_s": round(time.perf_counter() - t0, 1),
                "train_cpu_s": round(time.process_time() - c0, 1),  # one thread: the time on one free core
                "final_loss": sum(losses[-20:]) / 20, "parameters": sum(p.numel() for p in model.parameters()),
                "torch": torch.__version__}
    finally:
        torch.set_num_threads(threads)
    if out is not None:
        save(model, processor, card, out)
    return model, processor, card


def save(model, processor, card: dict, out: str | os.PathLike) -> Path:
    """Write an HF model directory with the toy's card (``toy_card.json``), atomically."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "toy_card.json").write_text(json.dumps(card, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def ship(seed: int) -> dict:
    """Make seed ``seed`` of the recipe the shipped checkpoint: the cached one when it was trained
    with this very recipe, else trained now; returns its card (the numbers are added by the caller)."""
    recipe = Recipe(seed=seed)
    cached = cache_path(recipe)
    card_path = cached / "toy_card.json"
    if card_path.is_file() and json.loads(card_path.read_text()).get("recipe") == json.loads(json.dumps(asdict(recipe))):
        tmp = SHIPPED.with_name(f".{SHIPPED.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(cached, tmp)
        shutil.rmtree(SHIPPED, ignore_errors=True)
        os.replace(tmp, SHIPPED)
        return json.loads(card_path.read_text())
    return train(recipe, SHIPPED)[2]


def cache_dir() -> Path:
    return Path(os.environ.get("HSR_CACHE", Path.home() / ".cache" / "hsr")) / "toy"


def recipe_hash(recipe: Recipe) -> str:
    """A short hash of the whole recipe (every field of :class:`Recipe`, whatever they are) and of the
    code that trains it (this module and the toy world), so a changed recipe never reuses an old toy."""
    from .io import stable_hash

    code = {m.__name__: hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest() for m in (W, sys.modules[__name__])}
    return stable_hash({"recipe": asdict(recipe), "code": code})[:10]


def cache_path(recipe: Recipe) -> Path:
    """Where a recipe's checkpoint is cached: ``$HSR_CACHE/toy/qwen2_vl[-mha]-s<seed>-<recipe hash>``."""
    return cache_dir() / f"qwen2_vl{'-mha' if recipe.kv_heads == 4 else ''}-s{recipe.seed}-{recipe_hash(recipe)}"


def parse(name: str) -> Recipe | None:
    """The recipe a toy name asks for (None: the shipped checkpoint); ValueError otherwise."""
    m = _NAME.fullmatch(name)
    if not m:
        raise ValueError(f"unknown toy model {name!r}; use toy:qwen2_vl, toy:qwen2_vl-s<seed>, toy:qwen2_vl-mha "
                         "or toy:qwen2_vl-mha-s<seed>")
    if m[1] is None and m[2] is None:
        return None
    return Recipe(seed=SHIPPED_SEED if m[2] is None else int(m[2]), kv_heads=4 if m[1] else 2)


def checkpoint(name: str, train_missing: bool = True) -> Path:
    """The folder of a toy model: the shipped one, or another recipe's (trained and cached on first use)."""
    recipe = parse(name)
    if recipe is None:
        if not (SHIPPED / "config.json").is_file():
            raise FileNotFoundError(f"{SHIPPED}: the shipped toy checkpoint is missing (hsr toy ship)")
        return SHIPPED
    path = cache_path(recipe)
    if not (path / "config.json").is_file():
        if not train_missing:
            raise FileNotFoundError(f"{path}: {name} is not trained yet (hsr toy train)")
        print(f"[hsr] training {name} (one to two minutes, cached in {path})", flush=True)
        train(recipe, path)
    return path
