"""Prompts in the checkpoint's own chat template, and calibration samples whose response
positions feed the importance scores (docs/method.md)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import FamilyAdapter, chat_style
from .data import Sample, open_image

_DEFAULT = FamilyAdapter()


def prompt_text(processor, question: str, adapter: FamilyAdapter = _DEFAULT) -> str:
    """The user turn (image, then question) with the generation prompt, as text."""
    return processor.apply_chat_template(adapter.messages(question), add_generation_prompt=True, tokenize=False)


def conversation_text(processor, question: str, response: str, adapter: FamilyAdapter = _DEFAULT) -> str:
    """The full conversation: user turn plus the assistant's response, as text."""
    return processor.apply_chat_template(adapter.messages(question, response), add_generation_prompt=False,
                                         tokenize=False)


def encode(processor, texts: list[str], images: list, device: torch.device | str = "cpu",
           add_special_tokens: bool = True) -> Any:
    """Tokenize texts with their images (one image each), left-padded, as tensors on ``device``.

    Images go in as one list per text, the form every supported processor accepts (Mllama's
    requires it). ``add_special_tokens=False`` keeps the tokenizer from adding its own BOS."""
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    extra = {} if add_special_tokens else {"add_special_tokens": False}
    try:
        enc = processor(text=texts, images=[[im] for im in images], return_tensors="pt", padding=True, **extra)
    finally:
        tok.padding_side = side
    return enc.to(device)


def encode_prompt(processor, sample: Sample, adapter: FamilyAdapter = _DEFAULT, device="cpu") -> Any:
    """One harmful/benign prompt (no response) with its image, ready for the model."""
    image = open_image(sample.image, sample.id)
    return encode(processor, [prompt_text(processor, sample.question, adapter)], [image], device)


@dataclass
class CalibrationSample:
    """A prompt+response conversation and the positions whose activations feed the scores.

    ``start``/``end`` bound the response positions ``[start, end)`` of ``inputs.input_ids[0]``.
    """

    id: str
    inputs: Any
    start: int
    end: int

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"][0]

    @property
    def n_response(self) -> int:
        return self.end - self.start

    def response_mask(self) -> torch.Tensor:
        """Boolean mask over the sequence: True at response positions."""
        mask = torch.zeros(self.input_ids.shape[0], dtype=torch.bool, device=self.input_ids.device)
        mask[self.start:self.end] = True
        return mask

    def labels(self) -> torch.Tensor:
        """Token ids at response positions, -100 elsewhere (HF's loss shifts them by one)."""
        labels = torch.full_like(self.input_ids, -100)
        labels[self.start:self.end] = self.input_ids[self.start:self.end]
        return labels[None]


def calibration_special_tokens(processor, fidelity: str = "paper") -> bool:
    """Whether calibration text gets the tokenizer's special tokens: not in ``reference`` mode with
    a Llama-3 template, whose released loader tokenizes with ``add_special_tokens=False`` (the
    template's BOS once; the Ships prompts keep the default and carry it twice)."""
    return not (fidelity == "reference" and chat_style(processor) == "llama3")


def response_span(prompt_len: int, total_len: int, style: str, fidelity: str = "paper") -> tuple[int, int]:
    """Response positions ``[start, end)``: every position at or after the prompt's length.

    ``reference`` fidelity with a Llama-3 template reproduces the released code: the last
    prompt position is kept and the final position dropped (the span shifts left by one).
    """
    if fidelity == "reference" and style == "llama3":
        return prompt_len - 1, total_len - 1
    return prompt_len, total_len


def encode_calibration(processor, sample: Sample, fidelity: str = "paper", adapter: FamilyAdapter = _DEFAULT,
                       device="cpu") -> CalibrationSample:
    """Encode prompt+response with the image and locate the response positions."""
    image = open_image(sample.image, sample.id)
    special = calibration_special_tokens(processor, fidelity)
    prompt = encode(processor, [prompt_text(processor, sample.question, adapter)], [image], add_special_tokens=special)
    full = encode(processor, [conversation_text(processor, sample.question, sample.response, adapter)], [image],
                  add_special_tokens=special)
    p_ids, f_ids = prompt["input_ids"][0], full["input_ids"][0]
    n = p_ids.shape[0]
    if f_ids.shape[0] <= n:
        raise ValueError(f"sample {sample.id}: the conversation is no longer than its prompt; "
                         "does the chat template render the assistant turn?")
    if not torch.equal(f_ids[:n], p_ids):
        warnings.warn(f"sample {sample.id}: the prompt's tokens are not a prefix of the conversation's; "
                      "response positions follow the prompt length (docs/method.md)", stacklevel=2)
    start, end = response_span(n, f_ids.shape[0], chat_style(processor), fidelity)
    return CalibrationSample(sample.id, full.to(device), start, end)


IMAGE_GEOMETRY = ("image_sizes", "image_grid_thw", "aspect_ratio_ids", "num_tiles")


def token_record(sample_id: str, inputs: Any, **positions: int) -> dict:
    """What a step fed the model for one sample, for diffing against another implementation:
    the token ids, the given positions (e.g. ``last``, or a response span ``start``/``end``) and
    the image geometry the processor reported (``image_sizes`` for LLaVA-NeXT and so on)."""
    rec: dict = {"id": sample_id, "input_ids": inputs["input_ids"][0].tolist(), **positions}
    for k in IMAGE_GEOMETRY:
        if k in inputs and inputs[k] is not None:
            v = inputs[k]
            rec[k] = v.tolist() if hasattr(v, "tolist") else v
    return rec


def render_tokens(tokenizer, ids: list[int], mark: int | None = None, marker: str = " ▶ ") -> str:
    """Decode ``ids`` for display: runs of one special token (image placeholders) shown as
    ``<tok>×n``, and ``marker`` inserted before position ``mark``."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    parts: list[str] = []
    i = 0
    while i < len(ids):
        if i == mark:
            parts.append(marker)
        j = i + 1
        if ids[i] in special:
            while j < len(ids) and ids[j] == ids[i] and j != mark:
                j += 1
            tok = tokenizer.convert_ids_to_tokens(ids[i])
            parts.append(tok if j - i == 1 else f"{tok}×{j - i}")
        else:
            while j < len(ids) and ids[j] not in special and j != mark:
                j += 1
            parts.append(tokenizer.decode(ids[i:j]))
        i = j
    return "".join(parts)
