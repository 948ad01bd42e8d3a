"""Answer scoring and profile arithmetic, checked against values computed by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from coe.config import ExpertConfig
from coe.scoring import chance, extract_choice, format_question, gold_letter, is_correct, normalize
from routers.profiles import Outcome, ProfileSet, build_profiles, skills_of, synthetic_profiles

MC = {"question": "2+2?", "choices": ["three", "four", "five", "twenty two"], "answer": "B"}
MC_TEXT = {"question": "Proverb?", "choices": ["Practice makes perfect", "To err is human"],
           "answer": "To err is human"}
FREE = {"question": "Capital of France?", "answer": ["Paris", "paris, france"]}


@pytest.mark.parametrize(("text", "letter"), [
    ("B", "B"), (" B. four", "B"), ("(B) four", "B"), ("The answer is C.", "C"), ("Answer: (A)", "A"),
    ("four", "B"), ("It is twenty two.", "D"), ("I think E", None), ("no idea", None), ("Because it is odd", None),
])
def test_extract_choice(text: str, letter: str | None) -> None:
    assert extract_choice(text, MC["choices"]) == letter  # type: ignore[arg-type]


def test_gold_letter_from_letter_or_text() -> None:
    assert gold_letter(MC) == "B"
    assert gold_letter(MC_TEXT) == "B"
    assert gold_letter(FREE) is None


def test_is_correct_multiple_choice_and_free_form() -> None:
    assert is_correct(MC, " B. four")
    assert not is_correct(MC, "A")
    assert is_correct(MC_TEXT, "B")
    assert is_correct(FREE, " The Paris.")
    assert is_correct(FREE, "Paris, France")
    assert not is_correct(FREE, "Lyon")


def test_format_question_letters_the_choices() -> None:
    text = format_question(MC)
    assert "A. three\nB. four\nC. five\nD. twenty two" in text
    assert text.endswith("(A, B, C, D).")
    assert format_question(FREE) == "Capital of France?"


def test_normalize_and_chance() -> None:
    assert normalize("  The  Answer, is: A!") == "answer is"
    assert chance(MC) == 0.25 and chance(FREE) == 0.0


def test_profile_arithmetic_by_hand() -> None:
    outcomes = [
        Outcome("m1", ("algebra",), True),
        Outcome("m1", ("algebra", "geometry"), False),
        Outcome("m1", ("geometry",), True),
        Outcome("m1", ("algebra",), True),
        Outcome("m2", ("algebra",), False),
        Outcome("m2", ("geometry", "geometry"), True),  # a repeated skill counts once
    ]
    profiles = build_profiles(outcomes, tau=0.5)
    m1, m2 = profiles.experts["m1"], profiles.experts["m2"]
    # m1: algebra +1 -1 +1 = +1; geometry -1 +1 = 0; 3 of 4 correct
    assert m1.skills == {"algebra": 1, "geometry": 0} and m1.accuracy == 0.75
    # m2: algebra -1; geometry +1; 1 of 2 correct
    assert m2.skills == {"algebra": -1, "geometry": 1} and m2.accuracy == 0.5
    # gamma ∝ acc^(1/0.5) = acc^2: 0.5625 and 0.25, normalised by 0.8125
    gamma = profiles.global_strength()
    assert gamma["m1"] == pytest.approx(0.5625 / 0.8125)
    assert gamma["m2"] == pytest.approx(0.25 / 0.8125)
    # S_m(q) for a query with skills {algebra, geometry, unseen}
    assert profiles.suitability("m1", ["algebra", "geometry", "unseen"]) == 1.0
    assert profiles.suitability("m2", ["algebra", "geometry", "unseen"]) == 0.0
    assert profiles.suitability("nobody", ["algebra"]) == 0.0
    assert profiles.vocabulary() == ["algebra", "geometry"]


def test_tau_sharpens_and_no_evidence_is_uniform() -> None:
    outcomes = [Outcome("a", ("s",), True), Outcome("b", ("s",), True), Outcome("b", ("s",), False)]
    flat = build_profiles(outcomes, tau=1.0).global_strength()
    sharp = build_profiles(outcomes, tau=0.25).global_strength()
    assert flat["a"] == pytest.approx(1 / 1.5)
    assert sharp["a"] == pytest.approx(1 / (1 + 0.5**4))
    assert sharp["a"] > flat["a"]
    none = build_profiles([Outcome("a", ("s",), False), Outcome("b", ("s",), False)]).global_strength()
    assert none == {"a": 0.5, "b": 0.5}


def test_synthetic_profiles_from_declarations() -> None:
    experts = [ExpertConfig(name="coder", backend="b", model="m", skills=["python"], categories=["coding"])]
    profiles = synthetic_profiles(experts)
    assert profiles.experts["coder"].synthetic
    assert profiles.experts["coder"].skills == {"python": 1, "coding": 1}
    assert profiles.global_strength() == {"coder": 1.0}


def test_save_load_round_trip(tmp_path: Path) -> None:
    profiles = build_profiles([Outcome("m", ("x",), True)], source="v.jsonl", skills_field="labels.subject")
    path = tmp_path / "p" / "profiles.json"
    profiles.save(path)
    loaded = ProfileSet.load(path)
    assert loaded == profiles
    assert '"version": 1' in path.read_text()


def test_skills_of_dotted_paths() -> None:
    item = {"labels": {"subject": "law", "keywords": ["logic", "law"]}}
    assert skills_of(item, "labels.subject") == ("law",)
    assert skills_of(item, "labels.keywords") == ("logic", "law")
    assert skills_of(item, "labels.missing") == ()
