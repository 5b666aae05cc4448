"""The CLI as a surface: quick commands import no torch, cli/ reaches the store only through the Python API,
and every command is documented (README table and --help)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from conftest import tiny_facts
from lemoe_store.cli import app
from lemoe_store.repo import Repo

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "lemoe_store" / "cli"
HEAVY = ("torch", "transformers", "faiss")


def _command_names() -> list[str]:
    """Every command and sub-command, e.g. `log`, `remote add`, `bench lifelong`."""
    names = []
    for name, command in get_command(app).commands.items():
        subcommands = getattr(command, "commands", None)
        names += [f"{name} {sub}" for sub in subcommands] if subcommands else [name]
    return sorted(names)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_llama_dir) -> Path:
    root = tmp_path_factory.mktemp("surface")
    repo = Repo.init(root / "work", model=str(tiny_llama_dir), layer=2, rank=8, max_steps=5, batch_size=6,
                     plan="original")
    repo.commit(tiny_facts(), message="two batches")
    repo.tag("v1", rev="HEAD~1")
    return repo.path


QUICK = [["--help"], ["log"], ["log", "--oneline", "-n", "1"], ["show", "HEAD"], ["status"], ["branch"],
         ["tag", "-l"], ["diff", "HEAD~1", "HEAD"], ["fsck"], ["gc"], ["remote", "list"], ["audit"],
         ["log", "--help"], ["serve", "--help"], ["bench", "lifelong", "--help"]]


def test_quick_commands_import_neither_torch_nor_transformers(store):
    script = (
        "import sys, json\n"
        "from lemoe_store.cli import app\n"
        "try:\n"
        "    app(sys.argv[1:])\n"
        "except SystemExit as stop:\n"
        "    code = stop.code\n"
        "print(json.dumps({'code': code, 'heavy': [m for m in %r if m in sys.modules]}), file=sys.stderr)\n"
    ) % (HEAVY,)
    for args in QUICK:
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                              env={**os.environ, "LEMOE_DIR": str(store), "COLUMNS": "120"})
        report = json.loads(done.stderr.strip().splitlines()[-1])
        assert report == {"code": 0, "heavy": []}, (args, done.stdout[-500:], done.stderr[-2000:])


def test_the_cli_reaches_the_store_only_through_the_python_api():
    for path in sorted(CLI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                assert not re.match(r"(\.\.|lemoe_store\.)stores\b", module), f"{path.name} imports {module}"


def test_every_command_is_in_the_readme_table_and_has_help():
    readme = (ROOT / "README.md").read_text()
    table = "\n".join(line for line in readme.splitlines() if line.startswith("| `lemoe "))
    for name in _command_names():
        assert f"`lemoe {name}" in table or f"`lemoe {name.split()[0]} " in table and name.split()[1] in table, name
        command = get_command(app)
        for part in name.split():
            command = command.commands[part]
        assert (command.help or "").strip(), f"lemoe {name} has no --help text"


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(store, monkeypatch):
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["show", "nosuchrev", "--store", str(store)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "unknown revision" in result.output

    def broken(self, rev="HEAD"):
        raise KeyError("a bug")

    monkeypatch.setattr(Repo, "show", broken)
    result = runner.invoke(app, ["show", "HEAD", "--store", str(store)])
    assert isinstance(result.exception, KeyError)  # not turned into a tidy message
