"""Processor loading that works without torchvision (image-only Qwen processors)."""

from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin


@functools.cache
def image_only_processor(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of ``cls`` without its video processor, under the same class name.

    Qwen2-VL's processor requires a video processor, and transformers' video processors need
    torchvision, which this package never installs. Images are all HSR uses, so the subclass
    drops the video attribute; it saves as ``cls`` would, so the saved folder stays loadable by
    ``AutoProcessor`` wherever torchvision is present.
    """

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(cls_):
            return [a for a in super().get_attributes() if a != "video_processor"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def load_processor(path: str | Path, **kwargs) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained``, falling back to an image-only processor when the
    checkpoint's processor needs a video processor that cannot be built here (no torchvision)."""
    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except (AttributeError, ImportError, OSError, ValueError, TypeError) as err:
        from transformers.models.auto.processing_auto import processor_class_from_name

        name = _processor_class_name(path, **kwargs)
        cls = processor_class_from_name(name) if name else None
        if cls is None or "video_processor" not in cls.get_attributes():
            raise
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(path, **_slow_image_processor(), **kwargs)
        try:
            return image_only_processor(cls)(image_processor, tok, chat_template=tok.chat_template)
        except Exception:
            raise err from None


def _slow_image_processor() -> dict[str, object]:
    """The keyword that asks for the PIL ("slow") image processor: ``backend="pil"`` where transformers
    has backends (its deprecated ``use_fast=False`` logs a warning there), ``use_fast=False`` before."""
    from transformers.models.auto import image_processing_auto

    return {"backend": "pil"} if hasattr(image_processing_auto, "_resolve_backend") else {"use_fast": False}


def _processor_class_name(path: str | Path, **kwargs) -> str | None:
    """The ``processor_class`` a checkpoint declares (processor or tokenizer config)."""
    import json

    from transformers.utils import cached_file

    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = cached_file(path, fname, _raise_exceptions_for_missing_entries=False, **kwargs)
        if f:
            with open(f) as fh:
                name = json.load(fh).get("processor_class")
            if name:
                return name
    return None
