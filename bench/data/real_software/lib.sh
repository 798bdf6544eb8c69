# Shared by the suites of bench/real_software_ctr.py --suite: `check NAME CMD...` runs CMD with its output
# in $LOG and prints "RESULT ok|fail NAME" (the driver's format); a failure's log tail goes to stderr.
# `same NAME CMD...` runs CMD and prints what it did for the driver to compare between runtimes, not to
# judge: "OUT NAME rc=RC" and then each line of its stdout and stderr as "OUTL NAME LINE" (at most 200).
# `info` lines are printed as is (figures a person compares by eye: du, timings). $PLACE, when set,
# prefixes every name (one container running a suite in two places).
LOG=$(mktemp)
check() {
    local name=${PLACE:+$PLACE.}$1; shift
    if "$@" >"$LOG" 2>&1; then echo "RESULT ok $name"
    else echo "RESULT fail $name"; { echo "--- $name failed: $*"; tail -20 "$LOG"; } >&2; fi
}
same() {
    local name=${PLACE:+$PLACE.}$1 rc=0; shift
    "$@" >"$LOG" 2>&1 || rc=$?
    echo "OUT $name rc=$rc"
    head -200 "$LOG" | sed "s|^|OUTL $name |"
}
info() { echo "INFO $*"; }
T0=$(date +%s.%N)
finish() { echo "MODULE $1 $(python3 -c "import time; print(f\"{time.time() - $T0:.2f}\")")"; }
