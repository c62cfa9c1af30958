"""One adapter per model family: where the decoder layers are, the attention geometry, the
prunable linears and the chat conventions. Everything family-specific lives here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Geometry:
    """Attention geometry of the language model, read from its text config.

    GQA layout (docs/method.md): q_proj rows [h·d, (h+1)·d) are query head h; k_proj/v_proj rows
    [g·d, (g+1)·d) are KV head g; o_proj columns [h·d, (h+1)·d) take head h's output; head h
    reads KV head g = h // (H / H_kv).
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    cross_layers: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not split into {self.n_kv_heads} KV groups")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_gqa(self) -> bool:
        return self.n_kv_heads < self.n_heads

    def kv_head(self, h: int) -> int:
        """The KV head that query head ``h`` reads."""
        return h // self.group_size

    def q_rows(self, h: int) -> slice:
        """q_proj output rows of query head ``h`` (also o_proj input columns of head ``h``)."""
        return slice(h * self.head_dim, (h + 1) * self.head_dim)

    def kv_rows(self, g: int) -> slice:
        """k_proj / v_proj output rows of KV head ``g``."""
        return slice(g * self.head_dim, (g + 1) * self.head_dim)

    @property
    def n_heads_total(self) -> int:
        return self.n_layers * self.n_heads


class FamilyAdapter:
    """Family conventions; subclasses override what differs. Works on the transformers >= 5
    layout ``model.model.language_model.layers`` shared by every supported family."""

    family: str = ""
    model_types: tuple[str, ...] = ()

    def language_model(self, model: nn.Module) -> nn.Module:
        """The text decoder (embeddings, decoder layers, final norm)."""
        return model.model.language_model

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def text_config(self, config):
        return config.get_text_config()

    def cross_layers(self, config) -> tuple[int, ...]:
        return ()

    def geometry(self, config) -> Geometry:
        """Geometry from the text config (never hard-coded)."""
        tc = self.text_config(config)
        heads = tc.num_attention_heads
        kv = getattr(tc, "num_key_value_heads", None) or heads
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
        return Geometry(tc.num_hidden_layers, heads, kv, head_dim, tc.hidden_size, self.cross_layers(config))

    def attention_name(self, config, layer: int) -> str:
        """Attribute name of layer ``layer``'s attention block."""
        return "cross_attn" if layer in self.cross_layers(config) else "self_attn"

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return getattr(self.decoder_layers(model)[layer], self.attention_name(model.config, layer))

    def prunable_names(self, config) -> list[str]:
        """Keys ``layers.{i}.{module}`` of every prunable linear, layer-major."""
        names = []
        for i in range(self.geometry(config).n_layers):
            attn = self.attention_name(config, i)
            names += [f"layers.{i}.{attn}.{p}" for p in ATTN_PARTS]
            names += [f"layers.{i}.mlp.{p}" for p in MLP_PARTS]
        return names

    def prunable_linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The language model's decoder linears (q, k, v, o, gate, up, down), keyed
        ``layers.{i}.{module}``; vision tower, projector, embeddings and lm_head excluded."""
        lm = self.language_model(model)
        out = {}
        for name in self.prunable_names(model.config):
            mod = lm.get_submodule(name)
            if not isinstance(mod, nn.Linear):
                raise TypeError(f"{name} is a {type(mod).__name__}, not nn.Linear")
            out[name] = mod
        return out

    def expand_layer_kwargs(self, kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
        """Decoder-layer keyword arguments recorded for one input, made fit for ``batch`` copies
        of it (batch-1 tensors are broadcast along dim 0)."""
        return {k: _broadcast(v, batch) for k, v in kwargs.items()}

    def user_content(self, question: str) -> list[dict]:
        """User turn: the image, then the question (docs/method.md)."""
        return [{"type": "image"}, {"type": "text", "text": question}]

    def messages(self, question: str, response: str | None = None) -> list[dict]:
        """Chat messages for a prompt, or a full conversation when ``response`` is given."""
        msgs = [{"role": "user", "content": self.user_content(question)}]
        if response is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
        return msgs


class LlavaNextAdapter(FamilyAdapter):
    family = "llava_next"
    model_types = ("llava_next",)


class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl",)


class Qwen25VLAdapter(FamilyAdapter):
    family = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)


class MllamaAdapter(FamilyAdapter):
    """Llama-3.2-Vision: cross-attention decoder layers sit among the self-attention ones and
    are scored, pruned and restored like them (their q, k, v, o and MLP)."""

    family = "mllama"
    model_types = ("mllama",)

    def cross_layers(self, config) -> tuple[int, ...]:
        return tuple(self.text_config(config).cross_attention_layers or ())

    def expand_layer_kwargs(self, kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
        """Mllama's cross-attention states are flattened as [batch · images · tiles, patches, D]:
        tile them whole instead of broadcasting."""
        out = super().expand_layer_kwargs(kwargs, batch)
        states = kwargs.get("cross_attention_states")
        if states is not None and batch > 1:
            out["cross_attention_states"] = states.repeat(batch, *([1] * (states.dim() - 1)))
        return out


def _broadcast(value: Any, batch: int) -> Any:
    """Expand batch-1 tensors (and tuples of them) along dim 0 to ``batch`` rows, without copying."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_broadcast(v, batch) for v in value)
    return value


ADAPTERS: dict[str, FamilyAdapter] = {a.family: a for a in
                                      (LlavaNextAdapter(), Qwen2VLAdapter(), Qwen25VLAdapter(), MllamaAdapter())}


def adapter_for(config=None, family: str = "auto") -> FamilyAdapter:
    """The adapter of ``family``, or the one whose model_type matches ``config`` when "auto"."""
    if family != "auto":
        if family not in ADAPTERS:
            raise ValueError(f"unsupported model family '{family}'; supported: {', '.join(ADAPTERS)}")
        return ADAPTERS[family]
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(f"unsupported model type '{model_type}'; hsr supports the families "
                     f"{', '.join(ADAPTERS)} (LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Llama-3.2-Vision)")


def chat_style(processor) -> str:
    """The chat format of a processor's template: 'llama3', 'qwen', 'mistral' or 'vicuna'."""
    tok = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None) or ""
    if "<|eot_id|>" in template or "<|start_header_id|>" in template:
        return "llama3"
    if "<|im_start|>" in template:
        return "qwen"
    if "[INST]" in template:
        return "mistral"
    return "vicuna"
