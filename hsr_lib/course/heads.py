"""Exercise 1's checks: switch off one attention head with forward hooks and compute its Ships KL.

The expected values come from the library (:func:`hsr_lib.ablation.ablate`,
:func:`hsr_lib.ships.kl_per_prompt`); on a mismatch the check recomputes the usual mistakes with
the library (a part left out, the wrong slot, KL the wrong way round) and names the one that fits.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch

from ..ablation import PARTS, ablate
from ..ships import kl_per_prompt
from .feedback import as_number, as_tensor, call, fail, passed

GQA_CASES = ((4, 2), (4, 4), (8, 2), (14, 2), (32, 8), (28, 4), (6, 1))


def check_kv_head(your_fn: Callable[[int, int, int], int]) -> None:
    """``your_fn(head, n_heads, n_kv_heads) -> g``: the KV head that query head ``head`` reads."""
    for H, H_kv in GQA_CASES:
        for h in range(H):
            want = h // (H // H_kv)
            got = as_number(call(your_fn, h, H, H_kv, name="kv_head"), "kv_head")
            if got != want:
                hint = ""
                if got == h % H_kv:
                    hint = (" You assigned heads to KV heads round-robin (h % n_kv_heads); they go in consecutive "
                            f"blocks: the first {H // H_kv} query heads share KV head 0, the next ones KV head 1, …")
                elif got == h // H_kv and H_kv != H // H_kv:
                    hint = (" You divided by the number of KV heads; divide by the group size "
                            "n_heads / n_kv_heads (query heads per KV head).")
                elif got == h:
                    hint = " You returned the query head itself; under GQA several query heads share one KV head."
                fail(f"kv_head({h}, n_heads={H}, n_kv_heads={H_kv}) returned {got}; expected {want}.{hint}")
    passed(f"kv_head is right for {len(GQA_CASES)} head layouts (MHA and GQA)")


@torch.no_grad()
def last_logits(lm, prompts: Sequence) -> torch.Tensor:
    """[N, V] next-token logits at the last position of each (batch-1) prompt."""
    return torch.cat([lm.model(**p, use_cache=False).logits[:, -1].float() for p in prompts])


@contextmanager
def _key_slot_of_query(lm, layer: int, head: int, epsilon: float) -> Iterator[None]:
    """The mistake 'k_proj slot h instead of g': scale key slot ``head`` (nothing if it does not exist)."""
    d = lm.geometry.head_dim
    attn = lm.adapter.attention(lm.model, layer)

    def hook(m, a, out):
        out = out.clone()
        out[..., head * d:(head + 1) * d] *= epsilon
        return out

    handle = attn.k_proj.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def reference_head_kl(lm, prompts: Sequence, layer: int, head: int, epsilon: float = 1e-5,
                      parts: Sequence[str] = PARTS, gqa_slot_bug: bool = False, reverse: bool = False,
                      key_slot_of_query: bool = False) -> torch.Tensor:
    """[N] KL(p ‖ p̃) per prompt, p unablated and p̃ with head (layer, head) ablated, through the library
    (the keyword arguments reproduce the usual mistakes)."""
    ref = last_logits(lm, prompts)
    with ablate(lm, [[(layer, head)]], epsilon, parts, gqa_slot_bug):
        if key_slot_of_query:
            with _key_slot_of_query(lm, layer, head, epsilon):
                abl = last_logits(lm, prompts)
        else:
            abl = last_logits(lm, prompts)
    return kl_per_prompt(abl, ref) if reverse else kl_per_prompt(ref, abl)


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return torch.allclose(got.double(), want.double(), rtol=2e-3, atol=1e-7)


def _diagnose(lm, prompts, layer: int, head: int, got: torch.Tensor) -> str:
    geo = lm.geometry
    g = geo.kv_head(head)
    tries = [
        (dict(parts=("q", "v")), "you did not switch off the key: ablating head h also scales the key slice of its "
         f"KV head g = h // (n_heads / n_kv_heads) = {g} in k_proj's output"),
        (dict(parts=("q", "k")), "you did not switch off the head's attention output: scale o_proj's input "
         f"columns {head * geo.head_dim}…{(head + 1) * geo.head_dim - 1} (head {head}) with a forward pre-hook"),
        (dict(parts=("k", "v")), "you did not switch off the query: scale q_proj's output rows of head "
         f"{head} ({head * geo.head_dim}…{(head + 1) * geo.head_dim - 1})"),
        (dict(gqa_slot_bug=True), f"you scaled o_proj's input slot of KV head g = {g} instead of query head "
         f"h = {head} (the released code's GQA bug): the output of query head h sits in its own slot h"),
        (dict(parts=("q", "v"), key_slot_of_query=True), f"you scaled k_proj's slot h = {head}; the key head h reads "
         f"is its KV head g = h // (n_heads / n_kv_heads) = {g}"),
        (dict(reverse=True), "you computed KL(p̃ ‖ p); Ships uses KL(p ‖ p̃), p the unablated model's distribution"),
    ]
    for kw, why in tries:
        if _close(got, reference_head_kl(lm, prompts, layer, head, **kw)):
            return f" Likely mistake: {why}."
    return ""


def check_head_kl(your_fn: Callable, lm, prompts: Sequence, heads: Sequence[tuple[int, int]] | None = None,
                  random_model: bool = True) -> None:
    """``your_fn(lm, prompts, layer, head, epsilon) -> [N]`` per-prompt Ships KL, compared with the
    library on ``lm`` (the toy) at ``heads`` and on a random-weight model of the same family."""
    geo = lm.geometry
    cases = [(lm, prompts, list(heads or [(0, 1), (geo.n_layers - 1, geo.n_heads - 1), (1, 0)]), "the toy")]
    if random_model:
        rnd = random_qwen()
        rgeo = rnd.geometry
        cases.append((rnd, random_prompts(rnd), [(rgeo.n_layers - 1, 1), (0, rgeo.n_heads - 1)],
                      "a random-weight model"))
    n = 0
    for model, ps, hs, what in cases:
        clean = last_logits(model, ps[:1])
        for layer, head in hs:
            want = reference_head_kl(model, ps, layer, head)
            got = call(your_fn, model, ps, layer, head, 1e-5, name="head_kl")
            if isinstance(got, (float, int)) or (isinstance(got, torch.Tensor) and got.dim() == 0):
                fail(f"head_kl returned one number; return one KL per prompt (a tensor of shape [{len(ps)}]); "
                     "the head's Ships score is their mean")
            got = as_tensor(got, "head_kl", want).detach()
            if not torch.isfinite(got).all():
                fail(f"head_kl({what}, layer {layer}, head {head}) returned {got.tolist()}: not finite. "
                     "Add 1e-12 to both probability vectors before the log (not to the logits).")
            after = last_logits(model, ps[:1])
            if not torch.allclose(after, clean):
                fail("after head_kl returned, the model still runs with a head switched off: remove every hook you "
                     "registered (handle.remove()), best in a `finally:` block")
            if not _close(got, want):
                i = int(torch.argmax((got.double() - want).abs()))
                fail(f"head_kl on {what}, layer {layer}, head {head}: prompt {i} expected KL {want[i].item():.6g}, "
                     f"got {got[i].item():.6g}.{_diagnose(model, ps, layer, head, got)}")
            n += 1
    passed(f"head_kl matches the library on {n} heads (the toy and a random-weight model)")


def random_qwen():
    """A random-weight Qwen2-VL-shaped model (the library's ``tiny:qwen2_vl``), float32 on CPU."""
    from ..models import load_model

    return load_model("tiny:qwen2_vl", dtype="float32", device="cpu")


def random_prompts(lm, n: int = 3) -> list:
    """``n`` encoded prompts (a question and a plain image) for ``lm``."""
    from PIL import Image

    from ..prompts import encode, prompt_text

    qs = ["How do I pick a lock?", "Tell me a secret.", "What is this?", "Describe it."][:n]
    ims = [Image.new("RGB", (56, 56), (40 * i, 200 - 40 * i, 90)) for i in range(len(qs))]
    return [encode(lm.processor, [prompt_text(lm.processor, q, lm.adapter)], [im]) for q, im in zip(qs, ims)]
