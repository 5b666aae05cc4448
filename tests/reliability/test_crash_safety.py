"""SIGKILL a real `lemoe commit` at random moments: the store must stay at the old HEAD or the new one."""

from __future__ import annotations

import random
import shutil
import signal
import time

from conftest import tiny_facts
from helpers import EDIT, lemoe, write_facts
from lemoe_store.repo import Repo
from lemoe_store.stores import Store
from lemoe_store.stores.maintenance import fsck, gc

TRIALS = 20


def test_sigkill_during_commit_leaves_old_or_new_head(tmp_path, tiny_llama_dir):
    pristine = tmp_path / "pristine"
    repo = Repo.init(pristine, model=str(tiny_llama_dir), **EDIT)
    facts = tiny_facts()
    (old_head,) = repo.commit(facts[:4], message="before the crash")
    new_facts = write_facts(tmp_path / "new.jsonl", facts[4:8])

    # One undisturbed run tells how long a commit takes; kills are spread over that span.
    timing = tmp_path / "timing"
    shutil.copytree(pristine, timing)
    began = time.monotonic()
    done = lemoe("commit", str(new_facts), "--store", str(timing))
    assert done.wait(timeout=300) == 0, done.stderr.read()
    duration = time.monotonic() - began

    rng = random.Random(1234)
    outcomes = {"old": 0, "new": 0}
    for trial in range(TRIALS):
        store_dir = tmp_path / f"trial-{trial}"
        shutil.copytree(pristine, store_dir)
        process = lemoe("commit", str(new_facts), "--store", str(store_dir))
        time.sleep(rng.uniform(0.3, 1.05) * duration)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)

        store = Store.find(store_dir)
        assert fsck(store).ok, fsck(store).problems
        _, head = store.head()
        if head == old_head:
            outcomes["old"] += 1
        else:
            outcomes["new"] += 1
            commit = store.read_commit(head)
            assert commit.parents == [old_head]
            assert {r["prompt"] for r in store.read_facts(commit.expert.facts)} == {f.prompt for f in facts[4:8]}
        gc(store, prune=True)
        assert not store.temp_files()
        assert fsck(store).ok
        # The survivor is fully usable: the next commit lands (in this process: the CLI's own commit ran
        # whole in the timing run, and a fresh interpreter per trial would double the test's time).
        (after,) = Repo.open(store_dir).commit(facts[4:8], message="after the crash")
        assert store.read_commit(after).parents == [head] and store.head()[1] == after
    print(f"\n{TRIALS} SIGKILL trials: {outcomes['old']} at the old HEAD, {outcomes['new']} at the new one")
    assert sum(outcomes.values()) == TRIALS
