# PostgreSQL 15 (Debian's postgresql-15) with its data directory here: initdb with data checksums (-k),
# start (its Unix socket bound in /var/run/postgresql on the container's root), pgbench -i and a short
# run with fsync on, a clean stop, pg_checksums --check, a restart that finds the data, amcheck of every
# index and table, an immediate stop (crash) and the recovery after it.
. /suites/lib.sh
BIN=/usr/lib/postgresql/15/bin
PGDATA=$PWD/pgdata
as_pg() { runuser -u postgres -- env PGHOST=/var/run/postgresql "$@"; }
mkdir -p /var/run/postgresql && chown postgres:postgres /var/run/postgresql
rm -rf "$PGDATA"; mkdir "$PGDATA"; chown postgres:postgres "$PGDATA"
check postgres.initdb as_pg $BIN/initdb -k -A trust -U postgres -D "$PGDATA"
echo "fsync = on" >> "$PGDATA/postgresql.conf"
start() { as_pg $BIN/pg_ctl -D "$PGDATA" -l "$PGDATA/log" -w -t 300 -o "-k /var/run/postgresql -c listen_addresses=''" start; }
# pg_test_fsync: every wal_sync_method works here ("n/a*" means O_DIRECT was refused)
check postgres.pg_test_fsync sh -c "$BIN/pg_test_fsync -s 1 -f '$PWD/fsync.test' > '$PWD/fsync.out' \
    && ! grep -q 'n/a\*' '$PWD/fsync.out'"
grep -E '^ +(open_datasync|fdatasync|fsync|open_sync) ' "$PWD/fsync.out" | head -4 | while read -r l; do info "pg_test_fsync $l"; done
check postgres.start start
check postgres.unix_socket test -S /var/run/postgresql/.s.PGSQL.5432
check postgres.fsync_on test "$(as_pg $BIN/psql -Atc 'show fsync')" = on
check postgres.checksums_on test "$(as_pg $BIN/psql -Atc 'show data_checksums')" = on
check postgres.pgbench_init as_pg $BIN/pgbench -i -s 1 postgres
check postgres.pgbench_run sh -c "runuser -u postgres -- env PGHOST=/var/run/postgresql $BIN/pgbench -c 2 -j 2 -t 100 postgres \
    | tee /dev/stderr | grep -q 'number of transactions actually processed: 200/200'"
sum() { as_pg $BIN/psql -Atc 'select count(*), sum(abalance), (select sum(delta) from pgbench_history) from pgbench_accounts'; }
before=$(sum)
info "postgres sums after pgbench: $before"
check postgres.stop as_pg $BIN/pg_ctl -D "$PGDATA" -w -t 300 -m fast stop
check postgres.pg_checksums as_pg $BIN/pg_checksums --check -D "$PGDATA"
check postgres.restart start
check postgres.data_after_restart test "$(sum)" = "$before"
check postgres.amcheck sh -c "runuser -u postgres -- env PGHOST=/var/run/postgresql $BIN/psql -qc 'create extension amcheck' \
    && runuser -u postgres -- env PGHOST=/var/run/postgresql $BIN/pg_amcheck --heapallindexed --rootdescend postgres"
as_pg $BIN/psql -qc 'insert into pgbench_history (tid, bid, aid, delta, mtime) values (1, 1, 1, 7, now())'
check postgres.crash_stop as_pg $BIN/pg_ctl -D "$PGDATA" -w -t 300 -m immediate stop
check postgres.recovery_start start
check postgres.committed_after_crash test "$(as_pg $BIN/psql -Atc 'select count(*) from pgbench_history where delta = 7 and tid = 1')" -ge 1
check postgres.final_stop as_pg $BIN/pg_ctl -D "$PGDATA" -w -t 300 -m fast stop
check postgres.pg_checksums_after_crash as_pg $BIN/pg_checksums --check -D "$PGDATA"
finish postgres
