"""`lemoe serve`: a real uvicorn process on 127.0.0.1, driven with the official `openai` client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from typer.testing import CliRunner

from conftest import tiny_facts
from lemoe_store.cli import app
from lemoe_store.repo import Repo
from lemoe_store.schemas.facts import Fact
from lemoe_store.serve.text import StreamedText

EDIT = dict(layer=2, rank=16, lr=2e-2, max_steps=80, batch_size=4, plan="original")
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
UNRELATED = "0 1 2 3 4 5 6 7 8"
TOKENS = 6
runner = CliRunner()


class Server:
    def __init__(self, store: Path, env: dict, *args: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "from lemoe_store.cli import main; main()", "serve", "--store", str(store),
                   "--port", str(self.port), "--max-tokens", "64", *args]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lemoe serve exited: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.process.kill()
        raise RuntimeError("lemoe serve did not come up")

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)

    def stop(self) -> tuple[int, str, str]:
        """SIGTERM, then (exit code, stdout, stderr). After a graceful shutdown uvicorn re-raises the signal,
        so a clean stop ends with -SIGTERM, as an unhandled SIGTERM would."""
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=60)
        return self.process.returncode, out, err


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama_dir):
    """A store with two versions (tag v1 = first batch, main = two batches) and a server over it."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = root / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "chat_template": CHAT_TEMPLATE}))
    env = {**os.environ, "LEMOE_CACHE": str(root / "cache")}
    repo = Repo.init(root / "work", model=str(model_dir), **EDIT)
    repo.commit(tiny_facts()[:4], message="first")
    repo.tag("v1")
    repo.commit(tiny_facts()[4:8], message="second")
    server = Server(repo.store.root, env)
    yield server, repo
    if server.process.poll() is None:
        server.process.kill()


def _lemoe(response) -> dict:
    return response.model_extra["lemoe"]


def test_completions_chat_and_streams_agree_and_name_the_version(served):
    server, repo = served
    client = server.client()
    prompt = tiny_facts()[5].prompt
    head = repo.resolve("main")
    raw = client.completions.with_raw_response.create(model="lemoe:main", prompt=prompt, max_tokens=TOKENS,
                                                      temperature=0)
    completion = raw.parse()
    assert completion.choices[0].text == repo.ask(prompt, rev="main", max_new_tokens=TOKENS).text
    assert raw.headers["x-lemoe-version"] == head == _lemoe(completion)["version"]
    assert completion.usage.completion_tokens == TOKENS and completion.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="lemoe:main", prompt=prompt, max_tokens=TOKENS,
                                            temperature=0, stream=True))
    assert chunks[0].model_extra["lemoe"] == _lemoe(completion)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model="lemoe:main", messages=messages, max_tokens=TOKENS, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == TOKENS
    streamed = list(client.chat.completions.create(model="lemoe:main", messages=messages, max_tokens=TOKENS,
                                                   temperature=0, stream=True))
    assert streamed[0].model_extra["lemoe"]["version"] == head
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


def test_an_edited_prompt_names_its_commit_and_an_unrelated_prompt_says_base(served):
    server, repo = served
    client = server.client()
    for fact in tiny_facts()[:8]:
        raw = client.completions.with_raw_response.create(model="lemoe:main", prompt=fact.prompt,
                                                          max_tokens=TOKENS, temperature=0)
        routed = _lemoe(raw.parse())["routed"]
        introduced = repo.blame_fact(fact.prompt, rev="main").introduced_by
        assert routed["commit"] == introduced == raw.headers["x-lemoe-commit"]
        assert routed["fact_id"] == fact.id and routed["similarity"] >= routed["threshold"]
    raw = client.completions.with_raw_response.create(model="lemoe:main", prompt=UNRELATED, max_tokens=TOKENS,
                                                      temperature=0)
    assert _lemoe(raw.parse())["routed"] == "base" and raw.headers["x-lemoe-commit"] == "base"
    assert raw.parse().choices[0].text == repo.ask(UNRELATED, rev="main", max_new_tokens=TOKENS).text


def test_models_lists_head_branches_and_tags(served):
    server, repo = served
    models = {m.id: m.model_extra["lemoe"]["version"] for m in server.client().models.list()}
    assert models == {"lemoe": repo.resolve("HEAD"), "lemoe:HEAD": repo.resolve("HEAD"),
                      "lemoe:main": repo.resolve("main"), "lemoe:v1": repo.resolve("v1")}


def test_stop_sequences_and_seeded_sampling(served):
    server, _ = served
    client = server.client()
    full = client.completions.create(model="lemoe:v1", prompt=UNRELATED, max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[3:5]
    cut = client.completions.create(model="lemoe:v1", prompt=UNRELATED, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="lemoe:v1", prompt=UNRELATED, max_tokens=12, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text
    sampled = [client.completions.create(model="lemoe:v1", prompt=UNRELATED, max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_concurrent_clients_on_two_versions_get_their_own_answers_and_an_audit_row_each(served):
    server, repo = served
    versions = {"lemoe:v1": repo.resolve("v1"), f"lemoe:{repo.resolve('main')[:8]}": repo.resolve("main")}
    prompts = [f.prompt for f in tiny_facts()[:8]] + [UNRELATED]
    expected = {(name, p): repo.ask(p, rev=cid, max_new_tokens=TOKENS) for name, cid in versions.items() for p in prompts}
    started = time.time()

    def client_run(number: int) -> list[tuple[str, str, str, str]]:
        client, out = server.client(), []
        for i in range(25):
            name = list(versions)[(number + i) % 2]
            prompt = prompts[(number * 25 + i) % len(prompts)]
            raw = client.completions.with_raw_response.create(model=name, prompt=prompt, max_tokens=TOKENS,
                                                              temperature=0)
            out.append((name, prompt, raw.parse().choices[0].text, raw.headers["x-lemoe-commit"]))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [row for rows in pool.map(client_run, range(8)) for row in rows]
    assert len(results) == 200
    for name, prompt, text, commit in results:
        answer = expected[(name, prompt)]
        assert (text, commit) == (answer.text, answer.commit or "base"), (name, prompt)

    deadline = time.monotonic() + 10
    while len(rows := repo.audit(since=_datetime(started))) < 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(rows) == 200
    want = sorted((versions[n], a.commit or "base") for n, p, _, _ in results for a in [expected[(n, p)]])
    assert sorted((r.version, r.routed_commit) for r in rows) == want
    first_commit = repo.resolve("v1")
    assert len(repo.audit(commit="v1", since=_datetime(started))) == sum(1 for _, c in want if c == first_commit)


def _datetime(timestamp: float):
    import datetime as dt

    return dt.datetime.fromtimestamp(timestamp).astimezone()


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    server, _ = served
    good = {"model": "lemoe:main", "prompt": UNRELATED, "max_tokens": 2, "temperature": 0}
    cases = [
        (b"{not json", 400, "parse the JSON"),
        ({**good, "model": "lemoe:nosuchbranch"}, 404, "nosuchbranch"),
        ({**good, "model": "gpt-4o"}, 404, "lemoe:<rev>"),
        ({**good, "model": "lemoe:../../../etc/passwd"}, 404, "passwd"),
        ({**good, "max_tokens": "ten"}, 400, "max_tokens"),
        ({**good, "max_tokens": 1000}, 400, "at most 64"),
        ({**good, "prompt": "the lazy dog " * 200}, 400, "maximum context length is 256"),
        ({**good, "logprobs": 2}, 400, "Unrecognized request argument supplied: logprobs"),
        ({k: v for k, v in good.items() if k != "prompt"}, 400, "prompt"),
    ]
    for body, status, words in cases:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{server.url}/v1/completions", content=content,
                              headers={"content-type": "application/json"})
        assert response.status_code == status, (body, response.text)
        assert words in response.json()["error"]["message"], response.text
    chat = httpx.post(f"{server.url}/v1/chat/completions",
                      json={"model": "lemoe:main", "messages": [{"role": "user", "content": 3}]})
    assert chat.status_code == 400 and "messages.0.content" in chat.json()["error"]["param"]
    assert httpx.post(f"{server.url}/v1/completions", json=good).status_code == 200


def test_a_commit_made_while_serving_is_answered_by_the_next_head_request(served):
    server, repo = served
    fact = Fact(prompt="Kestria's national bird is", target="Rome", id="new-bird", subject="Kestria")
    [cid] = Repo.open(repo.store.root).commit([fact], message="while serving")
    raw = server.client().completions.with_raw_response.create(model="lemoe:HEAD", prompt=fact.prompt,
                                                               max_tokens=TOKENS, temperature=0)
    assert raw.headers["x-lemoe-version"] == cid
    assert _lemoe(raw.parse())["routed"]["commit"] == cid


def test_sigterm_stops_cleanly_and_the_audit_trail_lists_and_counts_answers(served):
    server, repo = served
    code, out, err = server.stop()
    assert code == -signal.SIGTERM and out == "", err
    assert "Application shutdown complete" in err and "Traceback" not in err
    first = repo.resolve("v1")
    listed = runner.invoke(app, ["audit", "--store", str(repo.store.root), "--commit", "v1", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert rows and {r["routed_commit"] for r in rows} == {first}
    assert all(r["prompt"] and len(r["prompt_sha256"]) == 64 for r in rows)
    total = len(repo.audit())
    for maintenance in (["reindex"], ["gc", "--prune"]):  # the audit trail is not derived data
        assert runner.invoke(app, [*maintenance, "--store", str(repo.store.root)]).exit_code == 0
    assert len(repo.audit()) == total
    reverted = runner.invoke(app, ["revert", "v1", "--store", str(repo.store.root)])
    assert reverted.exit_code == 0 and f"{len(rows)} served answer(s)" in reverted.output


def test_an_api_key_is_required_once_set_and_off_loopback(tmp_path, served):
    _, repo = served
    refused = runner.invoke(app, ["serve", "--store", str(repo.store.root), "--host", "0.0.0.0"])
    assert refused.exit_code == 1 and "--api-key" in refused.output
    server = Server(repo.store.root, {**os.environ}, "--api-key", "s3cret", "--no-log-prompts")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        completion = server.client("s3cret").completions.create(model="lemoe:main", prompt="hidden prompt",
                                                                  max_tokens=2, temperature=0)
        assert completion.choices[0].text is not None
    finally:
        assert server.stop()[0] == -signal.SIGTERM
    last = repo.audit(limit=1)[0]
    assert last.prompt is None and last.prompt_sha256 == __import__("hashlib").sha256(b"hidden prompt").hexdigest()


def test_streamed_pieces_join_up_to_the_final_text():
    pieces = ["Hel", "lo", ", wor", "\ufffd", "ld", " #", "#", " after"]  # \ufffd: a character still incomplete
    decoded = ["Hel", "lo", ", wor", "\ufffd", "\u00e9ld", " #", "#", " after"]

    def decode(ids: list[int]) -> str:
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffdld", "\u00e9ld")

    text = StreamedText(decode, stops=["##"])
    released = [text.push([i]) for i in range(len(decoded))]
    assert "\ufffd" not in "".join(released)
    assert "".join(released) + text.finish() == text.text() == "Hello, wor\u00e9ld " and text.stopped
