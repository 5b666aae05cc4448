"""History commands: branch, tag, diff, revert, replay, blame, fsck, gc."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer
from rich.table import Table

from ..editing.config import PLANS
from ..repo import Repo
from .output import JsonOption, RayOption, StoreOption, WorkersOption, console, fmt, print_json, print_table, short


def branch(
    name: Annotated[str | None, typer.Argument(help="Branch to create (omit to list).")] = None,
    rev: Annotated[str, typer.Argument(help="Where the new branch starts.")] = "HEAD",
    delete: Annotated[str | None, typer.Option("-d", "--delete", help="Delete this branch.")] = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """List, create or delete branches."""
    repo = Repo.open(store)
    if delete:
        cid = repo.delete_branch(delete)
        console.print(f"Deleted branch {delete} (was {short(cid)}).")
        return
    if name:
        cid = repo.branch(name, rev=rev)
        console.print(f"Created branch {name} at {short(cid)}")
        return
    current = repo.head()[0]
    branches = repo.branches()
    if json_:
        print_json({"current": current, "branches": branches})
        return
    for branch_name, cid in branches.items():
        mark = "*" if branch_name == current else " "
        console.print(f"{mark} {branch_name:<20} {short(cid)} {repo.get_commit(cid).subject}", highlight=False)


def tag(
    name: Annotated[str | None, typer.Argument(help="Tag to create.")] = None,
    rev: Annotated[str, typer.Argument(help="Commit to tag.")] = "HEAD",
    list_: Annotated[bool, typer.Option("-l", "--list", help="List tags.")] = False,
    delete: Annotated[str | None, typer.Option("-d", "--delete", help="Delete this tag.")] = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """List, create or delete tags."""
    repo = Repo.open(store)
    if delete:
        console.print(f"Deleted tag {delete} (was {short(repo.delete_tag(delete))}).")
    elif name and not list_:
        console.print(f"Tagged {short(repo.tag(name, rev=rev))} as {name}")
    elif json_:
        print_json(repo.tags())
    else:
        for tag_name, cid in repo.tags().items():
            console.print(f"{tag_name:<20} {short(cid)}", highlight=False)


def diff(
    rev_a: Annotated[str, typer.Argument(help="Older version.")],
    rev_b: Annotated[str, typer.Argument(help="Newer version.")] = "HEAD",
    behavior: Annotated[bool, typer.Option("--behavior", help="Also run affected prompts at both versions.")] = False,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Facts added / removed / overwritten and experts added / removed between two versions."""
    result = Repo.open(store).diff(rev_a, rev_b, behavior=behavior)
    if json_:
        print_json(asdict(result))
        return
    console.print(f"diff {short(result.rev_a)}..{short(result.rev_b)}: {len(result.added)} added, "
                  f"{len(result.removed)} removed, {len(result.overwritten)} overwritten facts; experts "
                  f"+{len(result.experts_added)} -{len(result.experts_removed)}; {result.bytes_delta:+,} bytes")
    table = Table("", "prompt", "before", "after")
    for sign, changes in (("+", result.added), ("-", result.removed), ("~", result.overwritten)):
        for change in changes:
            table.add_row(sign, change.prompt, change.before or "", change.after or "")
    if table.row_count:
        print_table(table)
    if result.behavior is not None:
        behavior = Table("kind", "prompt", f"answer at {short(result.rev_a)}", f"answer at {short(result.rev_b)}",
                          title="prompts whose greedy answer differs")
        for change in result.behavior:
            behavior.add_row(change.kind, change.prompt, change.answer_a, change.answer_b)
        if behavior.row_count:
            print_table(behavior)
        else:
            console.print("no prompt answers differently")


def revert(
    rev: Annotated[str, typer.Argument(help="The commit whose expert to drop (or a revert to undo).")],
    message: Annotated[str | None, typer.Option("-m", "--message", help="Commit message.")] = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Write a new commit without REV's expert; everything else stays."""
    repo = Repo.open(store)
    served = repo.served_answers(rev)
    if not json_:
        console.print(f"{served} served answer(s) came from the expert of {rev} (see `lemoe audit --commit {rev}`)",
                      highlight=False)
    cid = repo.revert(rev, message=message)
    if json_:
        print_json({"id": cid, "served_answers": served})
    else:
        console.print(f"[yellow]{short(cid)}[/] {repo.get_commit(cid).subject}", highlight=False)


def replay(
    branch_name: Annotated[str, typer.Option("-b", "--branch", help="New branch for the replayed history.")],
    plan: Annotated[str, typer.Option("--plan", "--order", help=f"Ordering: {', '.join(PLANS)}.")] = "cluster",
    seed: Annotated[int | None, typer.Option(help="Seed for planning and training.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Facts per expert.")] = None,
    since: Annotated[str | None, typer.Option("--from", help="Replay only facts added after this revision.")] = None,
    workers: WorkersOption = 1,
    ray: RayOption = None,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Retrain the history's facts under another ordering on a new branch and compare."""
    repo = Repo.open(store)
    with console.status(f"replaying with plan {plan}…"):
        created, rows = repo.replay(branch_name, plan=plan, seed=seed, batch_size=batch_size, since=since,
                                    workers=workers, ray=ray)
    if json_:
        print_json({"commits": created, "rows": [asdict(r) for r in rows]})
        return
    table = Table("branch", "ordering", "#batches", "Rel", "Gen", "Loc", "train s")
    for row in rows:
        table.add_row(row.label, row.plan, str(row.batches), fmt(row.rel), fmt(row.gen), fmt(row.loc),
                      fmt(row.seconds, 1))
    print_table(table)


def blame(
    query: Annotated[str | None, typer.Argument(help="A query prompt to audit.")] = None,
    fact: Annotated[str | None, typer.Option("--fact", help="A fact's prompt or id: who introduced it.")] = None,
    rev: Annotated[str | None, typer.Option("--rev", help="Version (default HEAD).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Anchor matches to show.")] = 5,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """Which commit/expert answers a query (or introduced a fact), with the evidence."""
    repo = Repo.open(store)
    if fact is not None:
        found = repo.blame_fact(fact, rev=rev)
        if json_:
            print_json(asdict(found))
            return
        console.print(f"{found.fact_id}: {found.prompt!r} -> {found.target!r}\n  introduced by "
                      f"{short(found.introduced_by)}, last changed by {short(found.last_changed_by)}, "
                      f"{'active' if found.active else 'not active (reverted)'} at this version", highlight=False)
        return
    if query is None:
        raise typer.BadParameter("give a QUERY or --fact")
    result = repo.blame(query, rev=rev, top_k=top_k)
    if json_:
        print_json(asdict(result))
        return
    if result.routed_expert is not None:
        console.print(f"routed to expert {result.routed_expert} of commit [yellow]{short(result.routed_commit)}[/] "
                      f"(threshold {result.threshold})")
    elif result.threshold is None and result.matches:
        console.print("base model answers: the nearest anchors name subjects this query does not contain")
    else:
        console.print(f"base model answers: no anchor reaches the threshold {result.threshold}")
    table = Table("commit", "expert", "fact", "similarity")
    for match in result.matches:
        table.add_row(short(match.commit), str(match.expert), match.prompt or match.fact_id, f"{match.similarity:.3f}")
    if table.row_count:
        print_table(table)
    console.print(f"answer:          [bold]{query}[/]{result.answer}", highlight=False)
    if result.answer_without_expert is not None:
        console.print(f"without expert:  [bold]{query}[/]{result.answer_without_expert}", highlight=False)


def fsck(store: StoreOption = None, json_: JsonOption = False) -> None:
    """Verify every object, ref, manifest and tree; exit 1 if anything is wrong."""
    report = Repo.open(store).fsck()
    if json_:
        print_json(asdict(report))
    else:
        for problem in report.problems:
            console.print(f"[red]{problem}[/]", highlight=False)
        console.print(f"checked {report.objects} objects, {report.commits} commits, {report.refs} refs: "
                      f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    if not report.ok:
        raise typer.Exit(1)


def gc(
    prune: Annotated[bool, typer.Option("--prune", help="Really delete (default: dry run).")] = False,
    store: StoreOption = None,
    json_: JsonOption = False,
) -> None:
    """List (or --prune) objects no ref or reflog reaches, and leftover temp files."""
    report = Repo.open(store).gc(prune=prune)
    if json_:
        print_json({"unreachable": report.unreachable, "temp_files": [str(p) for p in report.temp_files],
                    "bytes": report.bytes, "pruned": report.pruned})
        return
    verb = "removed" if prune else "would remove"
    console.print(f"{verb} {len(report.unreachable)} unreachable objects and {len(report.temp_files)} temp files "
                  f"({report.bytes:,} bytes){'' if prune else '; run with --prune to delete'}")


def register(app: typer.Typer) -> None:
    for fn in (branch, tag, diff, revert, replay, blame):
        app.command(rich_help_panel="History")(fn)
    for fn in (fsck, gc):
        app.command(rich_help_panel="Maintenance")(fn)
