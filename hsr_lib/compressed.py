"""``hsr export --format compressed-tensors`` (the ``[export]`` extra): the exported weights in
compressed-tensors' ``sparse-bitmask`` format, the format llm-compressor writes for sparse
checkpoints. Every pruned decoder linear is stored as its non-zero values, a bit mask of where they
are and the row offsets; everything else stays as it is. ``config.json`` gains the
``quantization_config`` that tells readers (transformers, vLLM) how to decompress.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

INDEX = "model.safetensors.index.json"
EXTRA = "pip install 'hsr[export]' (compressed-tensors>=0.12,<0.14: later releases dropped sparse-bitmask)"


def missing() -> str | None:
    """Why ``--format compressed-tensors`` cannot be written here (the extra to install), or None."""
    try:
        from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import BitmaskCompressor  # noqa: F401
    except ImportError as err:
        return f"--format compressed-tensors needs compressed-tensors with sparse-bitmask ({err}); {EXTRA}"
    return None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a saved model (one, or the shards its index names)."""
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        return [folder / f for f in sorted(set(index["weight_map"].values()))]
    return [folder / "model.safetensors"]


def disk_names(keys: list[str], modules: list[str]) -> dict[str, str]:
    """``{hsr module name: its weight's tensor name on disk without '.weight'}``: the one key ending in
    ``.<module>.weight`` outside the vision tower; ValueError when there is none or several."""
    out = {}
    for name in modules:
        hits = [k for k in keys if (k == f"{name}.weight" or k.endswith(f".{name}.weight"))
                and not re.search(r"vision|visual", k)]
        if len(hits) != 1:
            raise ValueError(f"module {name}: {len(hits)} weights on disk match it ({', '.join(hits[:3])})")
        out[name] = hits[0][: -len(".weight")]
    return out


def compress_folder(folder: Path, src, facts: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the saved weights of ``folder`` in sparse-bitmask format (the pruned decoder linears
    only) and add the compression config to ``config.json``; sizes before and after, in bytes."""
    import compressed_tensors
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from .masks import mask_shapes

    files = weight_files(folder)
    before = sum(f.stat().st_size for f in files)
    keys = []
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            keys += list(h.keys())
    mask_path = src.result.dir / "mask.safetensors" if src.realigned else src.result.mask_path
    targets = set(disk_names(keys, list(mask_shapes(mask_path))).values())
    exported = facts["structure"]["exported"]
    sparsity = sum(r["pruned"] for r in exported) / sum(r["params"] for r in exported)
    pattern = facts["structure"]["pattern"]
    still_nm = pattern != "unstructured" and not any(r["blocks_below_n"] for r in exported)
    config = BitmaskConfig(global_sparsity=sparsity, sparsity_structure=pattern if still_nm else "unstructured",
                           targets=[r"re:.*layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$"],
                           ignore=["re:.*(visual|vision).*", "lm_head"])
    compressor = ModelCompressor(sparsity_config=config)
    weight_map = {}
    for f in files:
        state = load_file(str(f))
        packed = compressor.sparsity_compressor.compress(state, compression_targets=targets)
        tmp = f.with_name(f".{f.name}.tmp")
        save_file({k: v.contiguous() for k, v in packed.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, f)
        weight_map.update(dict.fromkeys(packed, f.name))
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    compressor.update_config(str(folder))
    after = sum(f.stat().st_size for f in files)
    return {"format": "sparse-bitmask", "compressed_tensors": compressed_tensors.__version__,
            "modules": len(targets), "global_sparsity": sparsity, "bytes_before": before, "bytes_after": after}


def decompress(folder: str | os.PathLike) -> dict[str, Any]:
    """Every tensor of a compressed export, decompressed by compressed-tensors' own code."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_compression_config(
        json.loads((Path(folder) / "config.json").read_text())["quantization_config"])
    return dict(compressor.sparsity_compressor.decompress(str(folder)))


def bitmask_bytes(rows: int, cols: int, nonzero: int, value_bytes: int) -> int:
    """Bytes sparse-bitmask stores for one ``rows × cols`` matrix: its non-zero values, the bit mask
    packed per row (``ceil(cols / 8)`` bytes a row) and one int64 row offset per row (the few bytes
    of its shape aside)."""
    return nonzero * value_bytes + rows * -(-cols // 8) + rows * 8
