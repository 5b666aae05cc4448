"""What the tuning scripts share: a data file's records, and a span of them that is never edited (WISE's
irrelevant prompts, MEMOIR's background), refused if it overlaps the facts the script edits."""

from __future__ import annotations

import argparse

from lemoe_store.schemas.facts import Fact, load_facts


def records_and_never_edited(parser: argparse.ArgumentParser, path: str, span: str, edited: int,
                             flag: str) -> tuple[list[Fact], list[Fact]]:
    """Every record of `path`, and records START:END (`span`, given as `flag`); the first `edited` are the
    ones the script edits, so the span must start after them."""
    records = load_facts(path, skipped=[])
    first, last = (int(x) for x in span.split(":"))
    if first < edited:
        parser.error(f"{flag} must not overlap the {edited} edited facts")
    return records, records[first:last]
