"""One evaluation item (prompt text, image, gold data) and the error every loader raises."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from ..data import open_image
from ..io import stable_hash

from ..identity import file_hash as image_file_hash

ImageKind = Literal["path", "base64", "figstep"]
Kind = Literal["refusal", "mc_safety", "mcq", "vqa", "names", "benign"]


class BenchmarkError(ValueError):
    """A malformed or missing benchmark file; the message names the file (and row) at fault."""


@dataclass(frozen=True)
class EvalItem:
    """A benchmark item: the user text shown to the model, its image and the gold data to score it.

    ``image`` holds paths (``image_kind="path"``; several are tiled side by side), one base64
    string (``"base64"``, MMBench) or the text a FigStep image is rendered from (``"figstep"``).
    ``options`` are the (letter, text) pairs shown, in order; ``answer`` the gold letter
    (MMBench); ``safe_letters`` the letters that are not an attack success (Ch3Ef); ``answers``
    the gold strings (DocVQA); ``group`` ties MMBench's circular rotations of one question.
    """

    benchmark: str
    id: str
    question: str
    image: tuple[str, ...]
    image_kind: ImageKind = "path"
    kind: Kind = "refusal"
    category: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    answer: str | None = None
    safe_letters: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()
    group: str | None = None
    source: str = field(default="", compare=False)

    @property
    def letters(self) -> tuple[str, ...]:
        """The option letters shown, in order."""
        return tuple(k for k, _ in self.options)

    def image_identity(self) -> str:
        """What identifies the image the model sees, by content (docs/run-directory.md): the bytes of
        each image file (:func:`hsr_lib.identity.file_hash`, cached per machine), the base64 data, or
        FigStep's text and rendering settings."""
        if self.image_kind == "figstep":
            from . import figstep as F

            return stable_hash({"figstep": self.image[0], "font": F.FONT_FILE, "size": F.SIZE,
                                "font_size": F.FONT_SIZE, "origin": F.ORIGIN, "spacing": F.SPACING, "wrap": F.WRAP,
                                "steps": F.STEPS})
        if self.image_kind == "base64":
            return hashlib.sha256(self.image[0].encode("ascii", "replace")).hexdigest()[:16]
        return stable_hash([image_file_hash(p) for p in self.image])

    def load_image(self) -> Image.Image:
        """The item's image as RGB (rendered, decoded or opened; several paths tiled left to right)."""
        if self.image_kind == "figstep":
            from .figstep import render_figstep

            return render_figstep(self.image[0])
        if self.image_kind == "base64":
            return decode_base64_image(self.image[0], f"{self.source}: item {self.id!r}")
        images = [open_image(p, f"{self.benchmark}:{self.id}") for p in self.image]
        return images[0] if len(images) == 1 else tile(images)


def decode_base64_image(data: str, where: str) -> Image.Image:
    """Decode a base64-encoded image (as MMBench TSVs store them) to RGB."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as im:
            im.load()
            return im.convert("RGB")
    except (binascii.Error, OSError, ValueError) as e:
        raise BenchmarkError(f"{where}: the image column is not a base64-encoded image ({e})") from None


def tile(images: list[Image.Image]) -> Image.Image:
    """Paste images side by side on white, tops aligned (for items that hold several images)."""
    w, h = sum(im.width for im in images), max(im.height for im in images)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    return canvas


def first_n(items: list[EvalItem], n: int | None) -> list[EvalItem]:
    """The first ``n`` items in file order (all when ``n`` is None); MMBench rotations stay whole."""
    if n is None:
        return items
    groups = list(dict.fromkeys(it.group or it.id for it in items))
    keep = set(groups[:n])
    return [it for it in items if (it.group or it.id) in keep]


def find_data_file(root: Path, files: tuple[str, ...], label: str, how_to_get: str) -> Path:
    """``root`` itself when it is a file, else the first of ``files`` inside it; a
    :class:`BenchmarkError` naming the folder and how to get the data otherwise."""
    if root.is_file():
        return root
    for name in files:
        if (root / name).is_file():
            return root / name
    raise BenchmarkError(f"{label}: no {' or '.join(files)} in {str(root)!r}; {how_to_get}")


def read_json_file(path: Path):
    """Parse a benchmark's JSON file; a :class:`BenchmarkError` naming it when it is not JSON."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e})") from None


def find_test_json(root: Path, what: str, how_to_get: str) -> Path:
    """``root`` itself when it is a file, else ``root/test.json`` (VLGuard's test format); a
    BenchmarkError naming the folder and where to get the data otherwise."""
    path = root if root.is_file() else root / "test.json"
    if not path.is_file():
        raise BenchmarkError(f"{what}: no test.json in {str(root)!r}; {how_to_get}")
    return path
