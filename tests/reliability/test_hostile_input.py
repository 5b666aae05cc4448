"""Bad input of every kind: a clear one-line error with file:line, exit != 0, the store unchanged."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import tiny_facts
from helpers import EDIT, tree_hash
from lemoe_store.cli import app
from lemoe_store.repo import Repo
from lemoe_store.schemas.facts import FactsError, load_facts

runner = CliRunner()
GOOD = json.dumps({"prompt": "The capital of Atlantis is", "target": "Poseidonia"})

HAND_WRITTEN: dict[str, bytes] = {
    "malformed JSON": b'{"prompt": "a", "target": "b"\n',
    "not an object": b'"just a string"\n',
    "wrong type": b'{"prompt": ["a"], "target": "b"}\n',
    "number target": b'{"prompt": "a", "target": 42}\n',
    "empty prompt": b'{"prompt": "", "target": "b"}\n',
    "blank target": b'{"prompt": "a", "target": "   "}\n',
    "missing target": b'{"prompt": "a"}\n',
    "unknown field": b'{"prompt": "a", "target": "b", "eval": "rm -rf /"}\n',
    "1 MB prompt": json.dumps({"prompt": "x" * 1_000_000, "target": "b"}).encode() + b"\n",
    "2 MB line": b'{"prompt": "' + b"y" * 2_000_000 + b'", "target": "b"}\n',
    "invalid UTF-8": b'{"prompt": "caf\xe9", "target": "b"}\n',
    "NUL byte escaped": b'{"prompt": "a\\u0000b", "target": "b"}\n',
    "raw NUL byte": b'{"prompt": "a\x00b", "target": "b"}\n',
    "binary garbage": bytes(range(256)) * 4,
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep nesting jsonl": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
    "bad id": b'{"id": "../../etc/passwd", "prompt": "a", "target": "b"}\n',
    "rephrase not string": b'{"prompt": "a", "target": "b", "rephrases": [1]}\n',
    "locality not object": b'{"prompt": "a", "target": "b", "locality": ["x"]}\n',
    "good then bad": (GOOD + "\n" + GOOD.replace("Poseidonia", "") + "\n").encode(),
    "zsre bad alt": b'[{"src": "Who?", "alt": 5, "rephrase": "Who is?", "loc": "x", "loc_ans": "y"}]',
    "counterfact empty": b'[{"prompt": "", "target_new": "b", "case_id": 1}]',
    "empty file": b"",
    "conflicting facts": (GOOD + "\n" + GOOD.replace("Poseidonia", "Atlantica") + "\n").encode(),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir):
    repo = Repo.init(tmp_path_factory.mktemp("hostile") / "store", model=str(tiny_llama_dir), **EDIT)
    repo.commit(tiny_facts()[:4], message="before hostile input")
    return repo.store.root


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_bad_input_is_refused_cleanly(store, tmp_path, name):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(HAND_WRITTEN[name])
    before = tree_hash(store)
    result = runner.invoke(app, ["commit", str(path), "--store", str(store)])
    assert result.exit_code == 1, result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message and len(message) < 400
    if name not in ("conflicting facts",):
        assert str(path) in message  # names the file (and line or record)
    assert tree_hash(store) == before


@pytest.mark.parametrize("args", [
    ["show", "../../../../etc/passwd"],
    ["show", "0" * 64],
    ["checkout", "refs/../../x"],
    ["branch", "-rf"],
    ["branch", "a/../../b"],
    ["tag", "/etc/passwd"],
    ["ask", "x", "--rev", "HEAD~99"],
    ["log", "nosuch"],
])
def test_hostile_names_and_revisions_are_refused(store, args):
    before = tree_hash(store)
    result = runner.invoke(app, [*args, "--store", str(store)])
    assert result.exit_code != 0
    assert tree_hash(store) == before


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["prompt", "target", "rephrases", "locality", "subject", "id", "src", "alt", "x"]),
        children, max_size=5),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(json_values, min_size=1, max_size=3))
def test_generated_records_never_crash_the_loader(tmp_path, records):
    path = tmp_path / "generated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        facts = load_facts(path)
    except FactsError as error:
        assert str(error).startswith(str(path)) and "\n" not in str(error)
    else:
        assert all(f.prompt.strip() and f.target.strip() for f in facts)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_generated_bytes_never_crash_the_loader(tmp_path, data):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(data)
    try:
        load_facts(path)
    except FactsError as error:
        assert "\n" not in str(error)
