"""Fact loading: native JSONL, ZsRE, CounterFact; one-line errors that name file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lemoe_store.schemas.facts import Fact, FactsError, Locality, as_facts, canonical_jsonl, load_facts, parse_jsonl

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(tmp_path, text: str | bytes, name: str = "facts.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_native_jsonl_roundtrips_canonically(tmp_path):
    record = {"prompt": "The capital of Atlantis is", "target": "Poseidonia", "rephrases": ["Atlantis' capital:"],
              "locality": [{"prompt": "The capital of Peru is", "answer": "Lima"}], "subject": "Atlantis"}
    facts = load_facts(_write(tmp_path, json.dumps(record) + "\n\n"))
    assert facts[0].prompt == record["prompt"] and facts[0].id.startswith("f")
    data = canonical_jsonl(facts)
    assert parse_jsonl(data) == facts
    assert canonical_jsonl(parse_jsonl(data)) == data


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "a", "target": ""}', "facts.jsonl:1: target:"),
        ('{"prompt": "a"}', "facts.jsonl:1: (record): 'target' is a required property"),
        ('{"prompt": 3, "target": "b"}', "facts.jsonl:1: prompt: 3 is not of type 'string'"),
        ('{"prompt": "a", "target": "b", "extra": 1}', "facts.jsonl:1: (record): Additional properties"),
        ('{"prompt": "   ", "target": "b"}', "facts.jsonl:1: prompt: is blank"),
        ('{"prompt": "a\\u0000", "target": "b"}', "facts.jsonl:1: prompt: contains a NUL byte"),
        ('{"prompt": "a", "target": "b"}\n{"prompt": "a", ', "facts.jsonl:2: (record): invalid JSON"),
        ('[1, 2]', "facts.jsonl:record:1: (record): expected a JSON object"),
        ('{"prompt": "a", "target": "b", "locality": [{"prompt": "x"}]}', "locality.0: 'answer' is a required"),
    ],
)
def test_invalid_records_name_file_line_and_field(tmp_path, content, expected):
    with pytest.raises(FactsError) as info:
        load_facts(_write(tmp_path, content))
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_invalid_utf8_and_huge_prompts_are_refused(tmp_path):
    with pytest.raises(FactsError, match="facts.jsonl:1: .*invalid UTF-8"):
        load_facts(_write(tmp_path, b'{"prompt": "\xff", "target": "b"}\n'))
    huge = json.dumps({"prompt": "x" * 1_000_000, "target": "b"})
    with pytest.raises(FactsError, match="prompt: is longer than 2000 characters") as info:
        load_facts(_write(tmp_path, huge))
    assert len(str(info.value)) < 300


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(FactsError, match="holds no facts"):
        load_facts(_write(tmp_path, "\n"))


@pytest.mark.skipif(not SHARED.is_dir(), reason="benchmark data not present")
def test_zsre_and_counterfact_are_detected():
    zsre = load_facts(SHARED / "zsre_mend_eval.json")
    assert len(zsre) == 1037 and zsre[0].rephrases and zsre[0].locality
    skipped: list[str] = []
    train = load_facts(SHARED / "zsre_mend_train-1k.json", skipped=skipped)
    assert len(train) + len(skipped) == 1000 and all("target" in s for s in skipped)
    counterfact = load_facts(SHARED / "counterfact-edit-1k.json")
    assert counterfact[0] == Fact(**{**counterfact[0].__dict__})
    assert counterfact[0].id.startswith("cf")


def test_a_long_form_record_without_its_passage_is_refused_in_one_line(tmp_path):
    passage = {"prompt": "Ada Lovelace was an English mathematician. She", "target_new": "wrote the first program.",
               "subject": "Ada Lovelace", "locality_prompt": "nq question: who wrote hamlet", "locality_ground_truth": "Shakespeare"}
    path = tmp_path / "hallucination.json"
    path.write_text(json.dumps([passage, {k: v for k, v in passage.items() if k != "prompt"}]))
    with pytest.raises(FactsError) as error:
        load_facts(path)
    assert str(error.value) == f"{path}:record:2: missing field 'prompt' (the fact's prompt)"
    assert load_facts(tmp_path / "hallucination.json", skipped=[])[0].target == "wrote the first program."


def test_facts_take_plain_lists_and_dicts():
    fact = Fact(prompt="Lena Halden plays", target="cricket", rephrases=["Lena's sport is"],
                locality=[{"prompt": "0 1 2", "answer": "3"}, ["4 5", "6"]])
    assert fact.rephrases == ("Lena's sport is",) and fact.locality == (Locality("0 1 2", "3"), Locality("4 5", "6"))
    assert hash(fact) == hash(Fact.from_record(fact.to_record()))  # still frozen and hashable
    converted = as_facts([fact, {"prompt": "Eldham mayor", "target": "Priya", "subject": "Eldham"},
                          {"src": "Who wrote Winter Tides?", "alt": "Kofi"}])
    assert [f.target for f in converted] == ["cricket", "Priya", "Kofi"] and converted[0] is fact
    with pytest.raises(FactsError, match="facts:2: target"):
        as_facts([fact, {"prompt": "Eldham mayor", "target": ""}])


def test_zsre_portability_questions_load_as_evaluation_probes(tmp_path):
    first = load_facts(SHARED / "zsre_mend_eval.json")[0]
    assert first.portability == (Locality(
        "What type of sports event is the IAAF Combined Events Challenge, which was established in 2006?",
        "Athletics"),)
    assert Fact.from_record(first.to_record()) == first
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "Eldham mayor", "target": "Priya", "portability": [{"prompt": "Who?"}]}))
    with pytest.raises(FactsError) as error:
        load_facts(path)
    assert str(error.value) == f"{path}:1: portability.0: 'answer' is a required property"
