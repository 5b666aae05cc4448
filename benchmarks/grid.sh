#!/usr/bin/env bash
# Issue 16's side-by-side grid, every cell from one commit, with the settings frozen on the tuning splits
# (benchmarks/README.md, "The grid"). Each piece saves results.json after every cell, so a stopped run
# keeps what it finished; run again with the same OUT to redo a piece.
#
#     bash benchmarks/grid.sh [OUT]        # default OUT: benchmarks/results/grid
#
# Refuses to start from a tree with uncommitted changes: every results.json records the commit it ran.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/grid}"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "grid.sh: commit your changes first (every figure must come from one commit)" >&2
    exit 1
fi
data=../shared/data
all=lemoe-anchors,lemoe-paper,lemoe-anchors-no-plan,lemoe-learned-router,moe,ft-l,grace,wise,memoir
# WISE and MEMOIR edit one fact at a time in their papers and reference code: no batch rows for them.
batched=lemoe-anchors,lemoe-paper,moe,ft-l,grace

lemoe bench lifelong --methods "$all" --data "$data/zsre_mend_eval.json" --T 1,10,100,1000 \
    --protocol both --out "$out/zsre"
lemoe bench lifelong --methods "$all" --data "$data/counterfact-edit-1k.json" --records 500:1000 \
    --T 10,100,500 --protocol both --out "$out/counterfact"
lemoe bench lifelong --methods "$all" --data "$data/hallucination-edit-300.json" --records 150:300 \
    --T 10,100,150 --protocol both --out "$out/hallucination"
lemoe bench batch --methods "$batched" --data "$data/zsre_mend_eval.json" --T 10,100,1000 \
    --protocol both --out "$out/zsre-batch"
