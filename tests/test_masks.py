"""Bit-packed masks in safetensors (hsr_lib.masks)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hsr_lib.masks import load_masks, mask_metadata, pack, save_masks, unpack


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 64), (2, 3, 5)])
def test_pack_unpack_round_trip(shape):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(shape, generator=g) < 0.5
    p = pack(m)
    assert p.dtype == torch.uint8 and p.numel() == -(-m.numel() // 8)
    assert torch.equal(unpack(p, shape), m)


def test_pack_refuses_non_bool():
    with pytest.raises(TypeError, match="bool"):
        pack(torch.zeros(3))


def test_file_round_trip_is_bit_packed_uint8(tmp_path):
    g = torch.Generator().manual_seed(1)
    masks = {"layers.0.self_attn.q_proj": torch.rand(64, 64, generator=g) < 0.5,
             "layers.1.mlp.down_proj": torch.rand(64, 130, generator=g) < 0.3}
    path = save_masks(tmp_path / "m.safetensors", masks, {"method": "wanda"})
    with safe_open(str(path), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())
        assert f.get_tensor("layers.1.mlp.down_proj").numel() == 64 * 130 // 8
    back = load_masks(path)
    assert set(back) == set(masks) and all(torch.equal(back[k], masks[k]) for k in masks)
    assert load_masks(path, ["layers.1.mlp.down_proj"]).keys() == {"layers.1.mlp.down_proj"}
    assert mask_metadata(path)["method"] == "wanda"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, then renamed


def test_load_refuses_other_files_and_unknown_keys(tmp_path):
    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an hsr mask file"):
        load_masks(tmp_path / "plain.safetensors")
    path = save_masks(tmp_path / "m.safetensors", {"a": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(KeyError, match="'b'"):
        load_masks(path, ["b"])


def test_rewrite_masks_replaces_some_and_copies_the_rest_packed(tmp_path):
    import pytest
    import torch
    from safetensors import safe_open

    from hsr_lib.masks import load_masks, mask_shapes, rewrite_masks, save_masks

    g = torch.Generator().manual_seed(0)
    masks = {"layers.0.mlp.up_proj": torch.rand(5, 7, generator=g) > 0.5,
             "layers.0.self_attn.q_proj": torch.rand(4, 4, generator=g) > 0.5}
    save_masks(tmp_path / "a.safetensors", masks, {"model": "m"})
    new_q = ~masks["layers.0.self_attn.q_proj"]
    rewrite_masks(tmp_path / "a.safetensors", tmp_path / "b.safetensors", {"layers.0.self_attn.q_proj": new_q},
                  {"variant": "hsr"})
    got = load_masks(tmp_path / "b.safetensors")
    assert torch.equal(got["layers.0.self_attn.q_proj"], new_q)
    assert torch.equal(got["layers.0.mlp.up_proj"], masks["layers.0.mlp.up_proj"])
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as a, safe_open(str(tmp_path / "b.safetensors"), "pt") as b:
        assert torch.equal(a.get_tensor("layers.0.mlp.up_proj"), b.get_tensor("layers.0.mlp.up_proj"))
        assert b.metadata()["model"] == "m" and b.metadata()["variant"] == "hsr"
    assert mask_shapes(tmp_path / "b.safetensors") == {"layers.0.mlp.up_proj": [5, 7], "layers.0.self_attn.q_proj": [4, 4]}
    with pytest.raises(ValueError, match="q_proj"):
        rewrite_masks(tmp_path / "a.safetensors", tmp_path / "c.safetensors",
                      {"layers.0.self_attn.q_proj": torch.zeros(3, 3, dtype=torch.bool)})
