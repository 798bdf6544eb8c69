# SQLite through its CLI (sqlite3 3.40): a WAL database (its -shm file MAP_SHARED by every connection,
# POSIX locks on the database and -shm) written by two processes while a third reads, integrity_check,
# checkpoint, .backup/.dump round trips, VACUUM, and a rollback-journal database the same way.
. /suites/lib.sh
N=150
writer() {  # writer DB WHO: N transactions of one row each, waiting up to 30 s for the lock
    for i in $(seq $N); do echo "insert into t values ('$2', $i);"; done \
        | sed '1i .timeout 30000' | sqlite3 "$1" >/dev/null
}
reader() {  # counts until both writers are done; fails if a read ever errors or goes backwards
    local last=0 n
    while [ ! -e "$1.done" ]; do
        n=$(sqlite3 -cmd '.timeout 30000' "$1" 'select count(*) from t') || return 1
        [ "$n" -ge "$last" ] || return 1
        last=$n
    done
}
for mode in wal delete; do
    db=$PWD/cli-$mode.db
    rm -f "$db"*
    check sqlite_cli.$mode.journal_mode test "$(sqlite3 "$db" "pragma journal_mode=$mode;" \
        "create table t (who text, i int);")" = "$mode"
    reader "$db" & r=$!
    writer "$db" a & a=$!
    writer "$db" b & b=$!
    wait $a; ra=$?; wait $b; rb=$?; touch "$db.done"; wait $r; rr=$?
    check sqlite_cli.$mode.two_writers test "$ra$rb" = 00
    check sqlite_cli.$mode.reader test "$rr" = 0
    check sqlite_cli.$mode.count test "$(sqlite3 "$db" 'select count(*), count(distinct who) from t')" = "$((2 * N))|2"
    check sqlite_cli.$mode.integrity test "$(sqlite3 "$db" 'pragma integrity_check')" = ok
    if [ $mode = wal ]; then
        check sqlite_cli.wal.shm_while_open sh -c "printf 'select count(*) > 0 from t;\\n.shell test -s $db-shm && echo SHM\\n' \
            | sqlite3 '$db' | grep -q SHM"
        check sqlite_cli.wal.checkpoint sh -c "sqlite3 '$db' 'pragma wal_checkpoint(truncate)' | grep -q '^0|0|0$'"
    fi
    check sqlite_cli.$mode.backup sh -c "sqlite3 '$db' '.backup $db.bak' && \
        test \"\$(sqlite3 '$db.bak' 'pragma integrity_check; select count(*) from t')\" = 'ok
$((2 * N))'"
    check sqlite_cli.$mode.dump_reload sh -c "sqlite3 '$db' .dump | sqlite3 '$db.re' && \
        test \"\$(sqlite3 '$db' .sha3sum)\" = \"\$(sqlite3 '$db.re' .sha3sum)\""
    check sqlite_cli.$mode.vacuum sh -c "sqlite3 '$db' 'delete from t where i % 2; vacuum; pragma integrity_check' \
        | grep -qx ok && test \"\$(sqlite3 '$db' 'select count(*) from t')\" = $N"
done
finish sqlite_cli
