#!/usr/bin/env bash
# The whole test suite as three pytest processes side by side on the machine's cores: the SLURM
# and distributed tests, which mostly wait on the scheduler or on each other's ranks, and the
# rest split in two halves by file (SPLIT below). Arguments go to all three. Exits nonzero if
# any failed; the reports are printed one after another.
set -uo pipefail
PY=${PY:-.venv/bin/python}
BESIDE="slurm or distributed"
# The files of the second half: about half of the non-SLURM time, most of it spent in CLI runs.
SPLIT=(tests/test_cli.py tests/test_report.py tests/test_ensemble.py tests/test_full_disk.py
       tests/test_one_writer.py tests/test_resume.py tests/test_bad_input.py tests/test_depth.py
       tests/test_lease.py)
IGNORE=()
for f in "${SPLIT[@]}"; do IGNORE+=(--ignore="$f"); done
tmp="${TMPDIR:-/tmp}"
slurm_log=$(mktemp)
half_log=$(mktemp)
trap 'rm -f "$slurm_log" "$half_log"' EXIT
"$PY" -m pytest -m "$BESIDE" -p no:cacheprovider --basetemp="$tmp/ncsweep-slurm-tests" "$@" \
    >"$slurm_log" 2>&1 &
beside=$!
"$PY" -m pytest -m "not ($BESIDE)" -p no:cacheprovider --basetemp="$tmp/ncsweep-half-tests" \
    "$@" "${SPLIT[@]}" >"$half_log" 2>&1 &
half=$!
"$PY" -m pytest -m "not ($BESIDE)" "${IGNORE[@]}" "$@"
first=$?
wait "$half"
second=$?
wait "$beside"
third=$?
echo "--- pytest -m \"not ($BESIDE)\" ${SPLIT[*]} ---"
cat "$half_log"
echo "--- pytest -m \"$BESIDE\" ---"
cat "$slurm_log"
exit $(( first != 0 || second != 0 || third != 0 ))
