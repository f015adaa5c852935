#!/usr/bin/env bash
# The whole test suite as two pytest processes side by side: the SLURM tests, which mostly wait
# on the scheduler, and the distributed ones (they share a reference run with a SLURM test),
# beside all the others. Arguments go to both. Exits nonzero if either failed; the second
# stream's report is printed after the first's.
set -uo pipefail
PY=${PY:-.venv/bin/python}
BESIDE="slurm or distributed"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$PY" -m pytest -m "$BESIDE" -p no:cacheprovider \
    --basetemp="${TMPDIR:-/tmp}/ncsweep-slurm-tests" "$@" >"$log" 2>&1 &
beside=$!
"$PY" -m pytest -m "not ($BESIDE)" "$@"
first=$?
wait "$beside"
second=$?
echo "--- pytest -m \"$BESIDE\" ---"
cat "$log"
exit $(( first != 0 || second != 0 ))
