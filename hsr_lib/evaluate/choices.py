"""Multiple-choice prompts and strict answer-letter extraction (MMBench, Ch3Ef).

The rules follow VLMEvalKit's rule-based matcher (``vlmeval/utils/matching_util.py``:
``can_infer_option`` then ``can_infer_text``), without its ChatGPT fallback: an answer the rules
cannot read is wrong, never guessed.
"""

from __future__ import annotations

from typing import Sequence

# LLaVA's MMBench prompt (llava/eval/model_vqa_mmbench.py, "single-pred-prompt")
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_PUNCT = ".()[],:;!*#{}"
LETTERS = "ABCDEFGHIJ"


def mc_prompt(question: str, options: Sequence[tuple[str, str]], hint: str | None = None) -> str:
    """``[hint]\\nquestion\\nA. option\\nB. option ...\\n`` + :data:`MC_INSTRUCTION`."""
    head = f"{hint}\n{question}" if hint else question
    lines = "\n".join(f"{k}. {v}" for k, v in options)
    return f"{head}\n{lines}\n{MC_INSTRUCTION}"


def extract_letter(response: str, letters: Sequence[str]) -> str | None:
    """The one option letter standing alone in ``response`` (after ``.()[],:;!*#{}`` become spaces).

    None when no letter or several appear, or when the letter is "A" in a longer answer
    (likely the article: "A dog is ..."), as in VLMEvalKit's ``can_infer_option``.
    """
    text = response
    for c in _PUNCT:
        text = text.replace(c, " ")
    words = text.split()
    found = [c for c in letters if c in words]
    if len(found) != 1:
        return None
    if found[0] == "A" and len(words) > 3:
        return None
    return found[0]


def match_option_text(response: str, options: Sequence[tuple[str, str]]) -> str | None:
    """The letter of the one option whose text occurs in ``response`` (case-insensitive), else None."""
    low = response.lower()
    hits = [k for k, v in options if str(v).strip() and str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def parse_choice(response: str, options: Sequence[tuple[str, str]]) -> str | None:
    """The chosen letter: :func:`extract_letter`, else :func:`match_option_text`, else None."""
    letters = [k for k, _ in options]
    return extract_letter(response, letters) or match_option_text(response, options)
