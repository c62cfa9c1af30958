"""Tiny random-weight VLMs of every family, with offline processors, for tests and CPU tutorials.

``build_tiny("qwen2_vl")`` returns ``(model, processor)`` in well under a second: the real
transformers architecture of that family at toy sizes, a byte-level tokenizer made in code (so
decoding is lossless), the family's PIL image processor (no torchvision) and a chat template in
the family's format. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

from .processors import image_only_processor

BUILD_VERSION = 1  # bump when build_tiny makes other weights or processors for a name and seed (it is in keys)

# Chat templates in each family's format (content: a string or a list of {"type": ...} parts).
_PARTS = (
    "{%- macro parts(content, image) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for c in content -%}{%- if c.type == 'image' -%}{{ image }}"
    "{%- elif c.type == 'text' -%}{{ c.text }}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
)
_TEMPLATES: dict[str, str] = {
    # llava-v1.6-vicuna: "SYSTEM USER: <image>\nQ ASSISTANT: A</s>"
    "vicuna": _PARTS
    + "{{- 'A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human\\'s questions. ' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- 'USER: ' + parts(m.content, IMAGE) + ' ' -}}"
    "{%- elif m.role == 'assistant' -%}{{- 'ASSISTANT: ' + parts(m.content, '') + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}",
    # llava-v1.6-mistral: "<s>[INST] <image>\nQ [/INST] A</s>"
    "mistral": _PARTS
    + "{{- '<s>' -}}{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '[INST] ' + parts(m.content, IMAGE) + ' [/INST]' -}}"
    "{%- elif m.role == 'assistant' -%}{{- ' ' + parts(m.content, '') + '</s>' -}}{%- endif -%}"
    "{%- endfor -%}",
    # Llama-3 (llama3-llava-next and Llama-3.2-Vision): header blocks closed by <|eot_id|>
    "llama3": _PARTS
    + "{{- '<|begin_of_text|>' -}}{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + parts(m.content, IMAGE) + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}",
    # Qwen2-VL / Qwen2.5-VL: ChatML with a default system turn
    "qwen": _PARTS
    + "{%- for m in messages -%}"
    "{%- if loop.first and m.role != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}{%- endif -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + parts(m.content, IMAGE)"
    " + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}",
}

_IMAGE = {"vicuna": "'<image>\\n'", "mistral": "'<image>\\n'", "llama3": "'<image>\\n'",
          "qwen": "'<|vision_start|><|image_pad|><|vision_end|>'", "mllama": "'<|image|>'"}


def chat_template(style: str, image: str | None = None) -> str:
    """The Jinja chat template of ``style``; ``image`` (a Jinja string literal) renders an image part."""
    return _TEMPLATES[style].replace("IMAGE", image or _IMAGE[style])


_SPECIALS = {
    "vicuna": dict(bos="<s>", eos="</s>", pad="<unk>", extra=["<unk>", "<image>"]),
    "mistral": dict(bos="<s>", eos="</s>", pad="<unk>", extra=["<unk>", "<image>", "[INST]", "[/INST]"]),
    "llama3": dict(
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
        extra=["<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|finetune_right_pad_id|>",
               "<image>", "<|image|>", "<|python_tag|>"],
    ),
    "qwen": dict(
        bos=None, eos="<|im_end|>", pad="<|endoftext|>",
        extra=["<|endoftext|>", "<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"],
    ),
}


def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable stand-in character → the byte it encodes."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _byte_of()


def make_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, no merges, the style's special tokens) built in code."""
    spec = _SPECIALS[style]
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = [s for s in [spec["bos"], spec["eos"], *spec["extra"]] if s]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in dict.fromkeys(names)])
    kwargs = {"eos_token": spec["eos"], "pad_token": spec["pad"]}
    if spec["bos"]:
        kwargs["bos_token"] = spec["bos"]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    hf.chat_template = chat_template(style)
    return hf


@dataclass(frozen=True)
class TinyText:
    """Toy text-decoder sizes shared by every tiny family."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def llama_kwargs(self, vocab: int) -> dict:
        return dict(
            vocab_size=vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, max_position_embeddings=4096,
        )


# name -> (architecture, chat style, text sizes)
TINY_MODELS: dict[str, tuple[str, str, TinyText]] = {
    "llava_next": ("llava_next", "vicuna", TinyText()),
    "llava_next_vicuna": ("llava_next", "vicuna", TinyText()),
    "llava_next_mistral": ("llava_next", "mistral", TinyText(kv_heads=2)),
    "llava_next_llama3": ("llava_next", "llama3", TinyText(kv_heads=2)),
    "qwen2_vl": ("qwen2_vl", "qwen", TinyText(kv_heads=2)),
    "qwen2_5_vl": ("qwen2_5_vl", "qwen", TinyText(kv_heads=2)),
    "mllama": ("mllama", "llama3", TinyText(layers=5, kv_heads=2)),
}


def _llava_next(style: str, t: TinyText, tok):
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextImageProcessorPil,
                              LlavaNextProcessor, MistralConfig)

    text_cls = MistralConfig if style == "mistral" else LlamaConfig
    extra = {"rope_theta": 500000.0} if style == "llama3" else {}
    text = text_cls(**t.llama_kwargs(len(tok)), **extra)
    vision = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=pinpoints,
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=tok.chat_template)
    return config, proc


def _qwen(arch: str, t: TinyText, tok, vision_overrides: dict | None = None, max_pixels: int = 28 * 28 * 16):
    from transformers import Qwen2VLImageProcessorPil

    ids = {k: tok.convert_tokens_to_ids(v) for k, v in dict(
        image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
        vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>").items()}
    text = dict(**t.llama_kwargs(len(tok)), bos_token_id=None, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(t.head_dim)})
    if arch == "qwen2_vl":
        from transformers import Qwen2VLConfig as Config, Qwen2VLProcessor as Processor

        vision = dict(depth=2, embed_dim=32, hidden_size=t.hidden, num_heads=2, mlp_ratio=2)
    else:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLProcessor as Processor

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=t.hidden,
                      fullatt_block_indexes=[1], window_size=56)
    vision.update(vision_overrides or {})
    config = Config(text_config=text, vision_config=vision, **ids)
    ip = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=max_pixels)
    proc = image_only_processor(Processor)(ip, tok, chat_template=tok.chat_template)
    return config, proc


def _mllama(t: TinyText, tok):
    from transformers import MllamaConfig, MllamaImageProcessorPil, MllamaProcessor

    image_id = tok.convert_tokens_to_ids("<|image|>")
    text = dict(**t.llama_kwargs(len(tok)), cross_attention_layers=[2], rope_theta=500000.0,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_global_layers=1, attention_heads=2, vision_output_dim=64, max_num_tiles=2,
                  intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_id)
    ip = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2)
    tok.chat_template = chat_template("llama3", _IMAGE["mllama"])
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    return config, proc


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen's M-RoPE split (temporal, height, width) of head_dim/2 rotary pairs, 2:3:3 like [16, 24, 24]."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, text: TinyText | None = None,
               vision: dict | None = None, max_pixels: int | None = None):
    """Build ``(model, processor)`` for ``tiny:<name>`` with random weights drawn from ``seed``.

    ``text`` replaces the toy text sizes, and (Qwen families) ``vision`` updates the vision
    config and ``max_pixels`` the image size: benchmarks build bigger random models this way."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model 'tiny:{name}'; choose one of: "
                         + ", ".join(f"tiny:{k}" for k in TINY_MODELS))
    arch, style, sizes = TINY_MODELS[name]
    sizes = text or sizes
    if (vision or max_pixels) and arch not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"vision / max_pixels overrides are only supported for the Qwen families, not {name}")
    tok = make_tokenizer(style)
    if arch == "llava_next":
        config, proc = _llava_next(style, sizes, tok)
    elif arch == "mllama":
        config, proc = _mllama(sizes, tok)
    else:
        config, proc = _qwen(arch, sizes, tok, vision, max_pixels or 28 * 28 * 16)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    _wake_up(model)
    model.eval()
    return model, proc


@torch.no_grad()
def _wake_up(model) -> None:
    """Make the random model's outputs depend visibly on its inputs.

    With initializer_range 0.02 the logits of a toy model are nearly constant; larger weights
    make attention heads matter, so head scores differ. Mllama's cross-attention gates start at
    zero (the image would not affect the text): open them.
    """
    g = torch.Generator().manual_seed(1234)
    for name, p in model.named_parameters():
        if name.endswith("cross_attn_attn_gate") or name.endswith("cross_attn_mlp_gate"):
            p.fill_(1.0)
        elif p.dim() == 2 and ("language_model" in name or name.startswith("lm_head")) and "embed" not in name:
            p.normal_(0.0, 1.0 / p.shape[1] ** 0.5, generator=g)
    # generations in readable gibberish: byte tokens outside printable ASCII get logit 0 while
    # printable ones get random logits of both signs, so greedy decoding picks printable ones
    unprintable = [i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))
                   if not (32 <= _BYTE_OF[c] < 127)]
    model.lm_head.weight[unprintable] = 0.0
