#!/usr/bin/env bash
# Issue 16's side-by-side grid, every cell from one commit, with the settings frozen on the tuning splits
# (benchmarks/README.md, "The grid"). Every cell is saved as it finishes, and each call resumes its OUT
# (`--resume`: it keeps the cells already there and runs the rest), so the grid runs in pieces: run this
# script again, from the same commit, until every cell is in.
#
#     bash benchmarks/grid.sh [OUT]        # default OUT: benchmarks/grid-results
#
# OUT's results.json files are tracked (its checkpoints/ are not): a machine that does not outlive a
# session keeps the grid's cells only in commits. Run it from a worktree of the grid's commit with OUT in
# the main checkout, and commit what lands there.
#
# Refuses to start from a tree with uncommitted changes, and `--resume` refuses results from another
# commit: every results.json holds cells of one commit only.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/grid-results}"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "grid.sh: commit your changes first (every figure must come from one commit)" >&2
    exit 1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever lemoe_store is installed
data=../shared/data
fast=lemoe-anchors,lemoe-paper,lemoe-anchors-no-plan,lemoe-learned-router,moe,ft-l,grace
# MEMOIR and WISE train each edit on 11 rows (the prompt and its 10 context templates) for up to 30 and 70
# steps, as their reference code does: tens of seconds per edit on 2 CPU cores, so their cells come after
# the others' at the same sizes.
slow=memoir,wise
# WISE and MEMOIR edit one fact at a time in their papers and reference code: no batch rows for them.
batched=lemoe-anchors,lemoe-paper,moe,ft-l,grace

zsre() {  # zsre METHODS T
    lemoe bench lifelong --methods "$1" --data "$data/zsre_mend_eval.json" --T "$2" \
        --protocol both --resume --out "$out/zsre"
}
counterfact() {  # counterfact METHODS T
    lemoe bench lifelong --methods "$1" --data "$data/counterfact-edit-1k.json" --records 500:1000 \
        --T "$2" --protocol both --resume --out "$out/counterfact"
}
hallucination() {  # hallucination METHODS T
    lemoe bench lifelong --methods "$1" --data "$data/hallucination-edit-300.json" --records 150:300 \
        --T "$2" --protocol both --resume --out "$out/hallucination"
}
batch() {  # batch T
    lemoe bench batch --methods "$batched" --data "$data/zsre_mend_eval.json" --T "$1" \
        --protocol both --resume --out "$out/zsre-batch"
}

# Cells that finish within a few hours here first, so every table's rows fill from the top; each call
# skips the cells it has. The last line's cells take 3 to 21 hours each on 2 CPU cores (WISE about 5
# minutes per hallucination passage): they need a machine that keeps its checkpoints, or a GPU.
zsre "$fast,$slow" 1,10; counterfact "$fast,$slow" 10; hallucination "$fast" 10; batch 10
zsre "$fast" 100; counterfact "$fast" 100; hallucination "$fast" 100; batch 100
zsre "$fast" 1000; counterfact "$fast" 500; hallucination "$fast" 150; batch 1000
zsre "$slow" 100; counterfact "$slow" 100; hallucination "$slow" 10
hallucination "$slow" 100,150; zsre "$slow" 1000; counterfact "$slow" 500
