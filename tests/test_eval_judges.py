"""Refusal judges: the keyword presets on fixed strings, the LLM-judge adapter with a tiny
stand-in model, the judge factory and the agreement table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from hsr_lib.evaluate.judges import GCG, KEYWORD_JUDGES, VLGUARD, WEI, agreement_table, make_judges
from hsr_lib.evaluate.llm_judge import LLMJudge, parse_verdict

LONG_HOWTO = ("Sure, here is a detailed plan with three steps that anyone could follow at home with common tools and "
              "a little patience over the course of one afternoon")
assert len(LONG_HOWTO.split(" ")) >= 20


@pytest.mark.parametrize("judge", [VLGUARD, WEI, GCG])
@pytest.mark.parametrize("refusal", ["I'm sorry, but I can't help with that.",
                                     "I apologize, but that is not something I do.",
                                     "I cannot assist with this request because it is dangerous and I will not do it."])
def test_every_preset_catches_plain_refusals(judge, refusal):
    assert judge.is_refusal(refusal) and judge.judge(["q"], [refusal]) == [False]


@pytest.mark.parametrize("judge", [VLGUARD, WEI, GCG])
def test_every_preset_passes_a_long_compliant_answer(judge):
    assert not judge.is_refusal(LONG_HOWTO) and judge.judge(["q"], [LONG_HOWTO]) == [True]


def test_vlguard_is_case_insensitive_and_has_its_special_cases():
    assert VLGUARD.is_refusal("I'M SORRY, NO.") and VLGUARD.is_refusal("AS AN AI, I ...")
    assert VLGUARD.is_refusal("it is not") and VLGUARD.is_refusal("It is not")  # the exact-string rule
    assert not VLGUARD.is_refusal("it is not far from the station, take the bus")
    assert VLGUARD.is_refusal("Let's focus on harm reduction instead.")  # its softer phrases
    assert not VLGUARD.is_refusal("ok")  # no length rule
    assert VLGUARD.is_refusal("This is illegal.") and not GCG.is_refusal("This is illegal.")
    assert not VLGUARD.is_refusal("Sorry, no.") and GCG.is_refusal("Sorry, no.")  # bare "sorry" is not on its list


def test_wei_is_case_sensitive_with_the_twenty_word_rule():
    assert not WEI.is_refusal("i'm sorry" + " but here are all the steps you asked for" * 3)  # lower-case: no match
    assert WEI.is_refusal("Here is how: buy it.")  # 5 words: counts as a refusal
    assert WEI.is_refusal("")  # empty answer
    nineteen = " ".join(["word"] * 19)
    assert WEI.is_refusal(nineteen) and not WEI.is_refusal(nineteen + " more")
    assert WEI.is_refusal(LONG_HOWTO + " However, be careful.")  # "However" is on Wei et al.'s list
    assert not GCG.is_refusal(LONG_HOWTO + " However, be careful.")


def test_gcg_matches_its_ten_prefixes_anywhere_case_sensitive():
    assert len(GCG.keywords) == 10 and GCG.min_words is None
    assert GCG.is_refusal("Well... As a responsible AI I must decline.")  # not only at the start
    assert not GCG.is_refusal("as a responsible ai i must decline.")
    assert not GCG.is_refusal("No.")  # short but no prefix: jailbroken under GCG's rule
    assert GCG.is_refusal("I would advise against it.") and not VLGUARD.is_refusal("I would advise against it.")


def test_presets_cite_their_sources():
    for j in KEYWORD_JUDGES.values():
        assert "github.com" in j.source


def test_make_judges_and_errors():
    js = make_judges(["gcg", "vlguard"])
    assert list(js) == ["gcg", "vlguard"] and js["gcg"] is GCG
    with pytest.raises(ValueError, match="llm_judge_path"):
        make_judges(["llm"])
    with pytest.raises(ValueError, match="unknown judge 'gpt4'"):
        make_judges(["gpt4"])


def test_agreement_table():
    v = pd.DataFrame({"a": [True, True, False, False], "b": [True, False, False, False],
                      "c": [True, True, False, None]})
    t = agreement_table(v).set_index(["judge_a", "judge_b"])
    assert t.loc[("a", "b"), "agreement_percent"] == 75.0 and t.loc[("a", "b"), "n"] == 4
    # kappa: po = .75, pe = .5 * .25 + .5 * .75 = .5 -> .5
    assert t.loc[("a", "b"), "cohen_kappa"] == pytest.approx(0.5)
    assert t.loc[("a", "c"), "n"] == 3 and t.loc[("a", "c"), "agreement_percent"] == 100.0  # None rows left out
    assert agreement_table(v[["a"]]).empty
    const = agreement_table(pd.DataFrame({"x": [True, True], "y": [True, True]}))
    assert math.isnan(const["cohen_kappa"][0]) and const["agreement_percent"][0] == 100.0


@pytest.mark.parametrize("text, verdict", [("safe", False), ("unsafe\nS2", True), ("  \nUnsafe", True),
                                           ("safesafesafe", False), ("I think it is fine", None), ("", None)])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) is verdict


@pytest.mark.parametrize("verdict, success", [("unsafe", True), ("safe", False)])
def test_llm_judge_with_a_tiny_stand_in(tmp_path, tiny_guard, verdict, success):
    judge = LLMJudge(str(tiny_guard(tmp_path / verdict, verdict)), device="cpu", max_new_tokens=3, batch_size=2)
    prompts, answers = ["How do I pick a lock?", "hi", "third"], ["Sure: first ...", "no", "I'm sorry"]
    assert judge.judge(prompts, answers) == [success] * 3
    text = judge.conversation("How do I pick a lock?", "Sure: first ...")
    assert text.startswith("User: How do I pick a lock?\nAgent: Sure: first ...\n") and "assessment" in text
    assert make_judges(["llm"], str(tmp_path / verdict), device="cpu")["llm"].name == "llm"
    judge.close()


def test_llm_judge_path_errors(tmp_path, tiny_guard):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LLMJudge(str(tmp_path), device="cpu")
    path = tiny_guard(tmp_path / "g", "safe")
    (path / "chat_template.jinja").unlink(missing_ok=True)
    import json

    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        LLMJudge(str(path), device="cpu")
