"""Facts: the unit of editing. Loads native JSONL, ZsRE and CounterFact files into `Fact` records.

Every bad record is reported as `file:line: field: problem` (line = record index + 1 for JSON arrays),
and nothing is returned unless the whole file is valid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import FactsError
from . import first_error

FORMATS = ("auto", "native", "zsre", "counterfact")
MAX_LINE_BYTES = 1 << 20  # one JSONL record; a longer line is refused without being read whole
MAX_ARRAY_BYTES = 256 << 20  # JSON arrays are parsed whole: beyond this, ask for JSONL


@dataclass(frozen=True)
class Locality:
    """A prompt and the answer expected after it: a locality probe (its answer must not change) or a
    portability probe (a question whose answer follows from the edit)."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Fact:
    """One edit: after it, `prompt` should be completed by `target`.

    `rephrases` are other wordings of the prompt (used for generalisation and, if the editor is told to,
    as extra routing anchors); `locality` pairs are unrelated prompts whose answers must not change;
    `portability` pairs are questions that depend on the edited fact (EasyEdit's portability: evaluation
    data only, never trained).
    """

    prompt: str
    target: str
    id: str = ""
    subject: str = ""
    rephrases: tuple[str, ...] = ()
    locality: tuple[Locality, ...] = field(default_factory=tuple)
    portability: tuple[Locality, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Lists and dicts, as from JSON, become the tuples and Locality pairs a frozen Fact holds.
        object.__setattr__(self, "rephrases", tuple(self.rephrases))
        for name in ("locality", "portability"):
            object.__setattr__(self, name, tuple(
                pair if isinstance(pair, Locality) else Locality(**pair) if isinstance(pair, dict) else Locality(*pair)
                for pair in getattr(self, name)))
        if not self.id:
            digest = hashlib.sha256(f"{self.prompt}\0{self.target}".encode()).hexdigest()
            object.__setattr__(self, "id", f"f{digest[:12]}")

    def to_record(self) -> dict:
        """The canonical native record (the form stored in facts objects)."""
        record = asdict(self)
        record["rephrases"] = list(self.rephrases)
        record["locality"] = [asdict(loc) for loc in self.locality]
        record["portability"] = [asdict(pair) for pair in self.portability]
        return {k: v for k, v in record.items() if v not in ("", [], ())}

    @classmethod
    def from_record(cls, record: dict) -> Fact:
        return cls(
            prompt=record["prompt"],
            target=record["target"],
            id=record.get("id", ""),
            subject=record.get("subject", ""),
            rephrases=tuple(record.get("rephrases", ())),
            locality=record.get("locality", ()),  # dicts: __post_init__ makes them Locality pairs
            portability=record.get("portability", ()),
        )


def as_facts(items: Iterable[Fact | dict]) -> list[Fact]:
    """Facts from Fact objects or plain dicts (native, ZsRE or CounterFact fields), each validated like a
    line of a facts file; FactsError names the item and the field."""
    return [item if isinstance(item, Fact) else _native(item, "facts", number)
            for number, item in enumerate(items, start=1)]


def canonical_jsonl(facts: list[Fact]) -> bytes:
    """Byte-stable JSONL of facts (sorted keys, no spaces): the content of a facts object."""
    lines = (json.dumps(f.to_record(), sort_keys=True, ensure_ascii=False, separators=(",", ":")) for f in facts)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def parse_jsonl(data: bytes, source: str = "<facts>") -> list[Fact]:
    return [_native(record, source, n) for n, record in _jsonl_records(iter(data.splitlines()), source)]


def _zsre(record: dict) -> dict:
    native = {"prompt": record.get("src"), "target": record.get("alt"), "subject": record.get("subject", "")}
    if record.get("rephrase"):
        native["rephrases"] = [record["rephrase"]]
    if record.get("loc") and record.get("loc_ans"):
        native["locality"] = [{"prompt": record["loc"], "answer": record["loc_ans"]}]
    portability = record.get("portability")
    if isinstance(portability, dict) and portability.get("New Question") and portability.get("New Answer"):
        native["portability"] = [{"prompt": portability["New Question"], "answer": portability["New Answer"]}]
    return native


def _counterfact(record: dict) -> dict:
    native = {"prompt": record.get("prompt"), "target": record.get("target_new"), "subject": record.get("subject", "")}
    if "case_id" in record:
        native["id"] = f"cf{record['case_id']}"
    rephrase = record.get("rephrase_prompt")
    if rephrase:
        native["rephrases"] = [rephrase] if isinstance(rephrase, str) else list(rephrase)
    if record.get("locality_prompt") and record.get("locality_ground_truth"):
        native["locality"] = [{"prompt": record["locality_prompt"], "answer": record["locality_ground_truth"]}]
    return native


_SOURCE_FIELDS = {"zsre": {"prompt": "src", "target": "alt"}, "counterfact": {"prompt": "prompt", "target": "target_new"}}
_CONVERTERS = {"native": lambda r: r, "zsre": _zsre, "counterfact": _counterfact}


def detect_format(record: object) -> str:
    if isinstance(record, dict):
        if "src" in record and "alt" in record:
            return "zsre"
        if "target_new" in record:
            return "counterfact"
    return "native"


def _check_text(value: str, where: str) -> None:
    if "\x00" in value:
        raise FactsError(f"{where}: contains a NUL byte")
    if not value.strip():
        raise FactsError(f"{where}: is blank")


def _native(record: object, source: str, line: int, fmt: str = "auto") -> Fact:
    where = f"{source}:{line}"
    if not isinstance(record, dict):
        raise FactsError(f"{where}: (record): expected a JSON object, got {type(record).__name__}")
    fmt = detect_format(record) if fmt == "auto" else fmt
    for field, source_field in _SOURCE_FIELDS.get(fmt, {}).items():
        if record.get(source_field) is None:  # e.g. a long-form record without its passage
            raise FactsError(f"{where}: missing field {source_field!r} (the fact's {field})")
    native = _CONVERTERS[fmt](record)
    problem = first_error("fact", native)
    if problem:
        raise FactsError(f"{where}: {problem}")
    texts = {"prompt": native["prompt"], "target": native["target"]}
    texts.update({f"rephrases.{i}": r for i, r in enumerate(native.get("rephrases", []))})
    for name in ("locality", "portability"):
        for i, pair in enumerate(native.get(name, [])):
            texts.update({f"{name}.{i}.prompt": pair["prompt"], f"{name}.{i}.answer": pair["answer"]})
    for name, value in texts.items():
        _check_text(value, f"{where}: {name}")
    return Fact.from_record(native)


def _bounded_lines(handle) -> Iterator[bytes]:
    while True:
        line = handle.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        yield line


def _jsonl_records(lines: Iterator[bytes], source: str) -> Iterator[tuple[int, object]]:
    for number, raw in enumerate(lines, start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise FactsError(f"{source}:{number}: (record): line longer than {MAX_LINE_BYTES:,} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FactsError(f"{source}:{number}: (record): invalid UTF-8 at byte {exc.start}") from None
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            raise FactsError(f"{source}:{number}: (record): invalid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise FactsError(f"{source}:{number}: (record): JSON nested too deeply") from None


def load_facts(path: str | Path, fmt: str = "auto", skipped: list[str] | None = None) -> list[Fact]:
    """Load and validate every record of a facts file (JSONL streamed line by line, or a JSON array).

    The first invalid record raises FactsError, unless a `skipped` list is given: then invalid records
    (not unreadable files) are left out and their one-line problems appended to it (for benchmark sets).
    """
    if fmt not in FORMATS:
        raise FactsError(f"unknown facts format {fmt!r} (choose from {', '.join(FORMATS)})")
    path = Path(path)
    source = str(path)
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise FactsError(f"{source}: cannot read: {exc.strerror}") from None
    with handle:
        head = handle.read(64).lstrip()
        handle.seek(0)
        if head.startswith(b"["):
            if path.stat().st_size > MAX_ARRAY_BYTES:
                raise FactsError(f"{source}: a JSON array over {MAX_ARRAY_BYTES >> 20} MB; use JSONL (one record a line)")
            numbered = _json_array_records(handle.read(), source)
            source = f"{source}:record"  # JSON arrays are addressed by record number, not line
        else:
            numbered = _jsonl_records(_bounded_lines(handle), source)
        facts = []
        for number, record in numbered:
            try:
                facts.append(_native(record, source, number, fmt))
            except FactsError as problem:
                if skipped is None:
                    raise
                skipped.append(str(problem))
    if not facts:
        raise FactsError(f"{source}: holds no facts")
    return facts


def _json_array_records(data: bytes, source: str) -> Iterator[tuple[int, object]]:
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FactsError(f"{source}:{line}: (record): invalid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise FactsError(f"{source}:{exc.lineno}: (record): invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise FactsError(f"{source}:1: (record): JSON nested too deeply") from None
    if not isinstance(records, list):
        raise FactsError(f"{source}:1: (record): expected a JSON array of records")
    return enumerate(records, start=1)


@dataclass(frozen=True)
class FactConflict:
    prompt: str
    targets: tuple[str, ...]


def find_duplicates_and_conflicts(facts: list[Fact]) -> tuple[list[Fact], list[FactConflict]]:
    """Exact duplicates (same prompt and target) and conflicts (same prompt, different targets)."""
    by_prompt: dict[str, list[Fact]] = {}
    for fact in facts:
        by_prompt.setdefault(fact.prompt, []).append(fact)
    duplicates, conflicts = [], []
    for prompt, group in by_prompt.items():
        targets = tuple(dict.fromkeys(f.target for f in group))
        if len(targets) > 1:
            conflicts.append(FactConflict(prompt, targets))
        seen: set[str] = set()
        for fact in group:
            if fact.target in seen:
                duplicates.append(fact)
            seen.add(fact.target)
    return duplicates, conflicts
