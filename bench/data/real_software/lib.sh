# Shared by the suites of bench/real_software_ctr.py --suite: `check NAME CMD...` runs CMD with its output
# in $LOG and prints "RESULT ok|fail NAME" (the driver's format); a failure's log tail goes to stderr.
# `info` lines are printed as is (figures a person compares by eye: du, timings).
LOG=$(mktemp)
check() {
    local name=$1; shift
    if "$@" >"$LOG" 2>&1; then echo "RESULT ok $name"
    else echo "RESULT fail $name"; { echo "--- $name failed: $*"; tail -20 "$LOG"; } >&2; fi
}
info() { echo "INFO $*"; }
T0=$(date +%s.%N)
finish() { echo "MODULE $1 $(python3 -c "import time; print(f\"{time.time() - $T0:.2f}\")")"; }
