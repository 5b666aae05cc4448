"""The grid's cells so far, as the Markdown tables benchmarks/README.md shows (both protocols per row).

    python benchmarks/grid_table.py [OUT]        # default OUT: benchmarks/grid-results

Reads each piece's results.json under OUT (zsre, counterfact, hallucination, zsre-batch), refuses pieces
from different commits, and prints one table per piece, rows grouped by T; at each T the best mean of
Rel / Gen / Loc under each protocol is in bold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PIECES = ("zsre", "counterfact", "hallucination", "zsre-batch")


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(saved: dict) -> list[str]:
    rows = saved["results"]
    long_form = all(r["gen"] is None for r in rows)  # hallucination: no rephrases, the target's perplexity
    head = ["method", "T", "Rel", "Gen", "Loc", "mean", "WILD Rel", "WILD Gen", "WILD Loc", "WILD mean",
            "fluency (base)", "degenerate (base)", "s/edit", "bytes/edit"]
    if any(r["portability"] is not None for r in rows):
        head[6:6] = ["Port."]
    if long_form:
        head = ["method", "T", "PPL (base)", "Loc", "WILD Loc", "s/edit", "bytes/edit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sorted({r["T"] for r in rows}):
        at_t = [r for r in rows if r["T"] == size]
        best = {key: max((r[key] for r in at_t if r[key] is not None), default=None) for key in ("mean", "wild_mean")}
        for r in at_t:
            def mark(key: str) -> str:
                text = fmt(r[key])
                return f"**{text}**" if r[key] is not None and r[key] == best[key] and len(at_t) > 1 else text

            cells = [r["title"], str(size)]
            if long_form:
                cells += [f"{fmt(r['ppl'], 2)} ({fmt(r['base_ppl'], 2)})", fmt(r["loc"]), fmt(r["wild_loc"])]
            else:
                cells += [fmt(r["rel"]), fmt(r["gen"]), fmt(r["loc"]), mark("mean")]
                cells += [fmt(r["portability"])] * ("Port." in head)
                cells += [fmt(r["wild_rel"]), fmt(r["wild_gen"]), fmt(r["wild_loc"]), mark("wild_mean"),
                          f"{fmt(r['fluency'], 2)} ({fmt(r['base_fluency'], 2)})",
                          f"{fmt(r['degenerate'], 2)} ({fmt(r['base_degenerate'], 2)})"]
            cells += [fmt(r["s_per_edit"], 2), f"{r['bytes_per_edit']:,.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("benchmarks/grid-results"))
    args = parser.parse_args()
    commits = set()
    for piece in PIECES:
        path = args.out / piece / "results.json"
        if not path.exists():
            continue
        saved = json.loads(path.read_text())
        commits.add(saved["commit"])
        records = f" records {saved['records']}" if saved["records"] else ""
        print(f"\n**{saved['mode']}, {Path(saved['data']).name}{records}** (`{path}`)\n")
        print("\n".join(table(saved)))
    if len(commits) > 1:
        sys.exit(f"grid_table.py: the pieces come from different commits: {', '.join(sorted(commits))}")
    print(f"\ncommit {commits.pop() if commits else '—'}")


if __name__ == "__main__":
    main()
