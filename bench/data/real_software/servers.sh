# A server and its client in one container, their data in the place ($PWD): redis 7 (a Unix socket in
# /run, a second server's in the place, TCP on 127.0.0.1; DEBUG POPULATE, SAVE, BGSAVE by a forked child,
# an append-only file and its rewrite, a restart that loads both, redis-check-rdb/-aof, redis-benchmark),
# nginx (sendfile of files in the place to curl over a Unix socket in /run, one in the place and TCP on
# 127.0.0.1: checksums, a range, HEAD headers, autoindex of odd names, 403/404, reload, quit), memcached (a
# Unix socket in /tmp, TCP on 127.0.0.1) through nc. Outputs that do not depend on time or pids are
# printed with `same` for the driver to compare. QUICK=1 (the CI test) makes it smaller: 500 keys instead
# of 20000, a 1 MiB file instead of 8, 200 requests per benchmark instead of 2000.
. /suites/lib.sh
P=$PWD
KEYS=20000 MIB=8 REQS=2000
[ -n "${QUICK:-}" ] && KEYS=500 MIB=1 REQS=200
rm -rf redis redis-b www nginx mc.out /run/redis-a.sock /tmp/mc.sock
mkdir -p redis redis-b www nginx
wait_for() { for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
gone() { ! kill -0 "$1" 2>/dev/null; }
pidof_file() { cat "$1" 2>/dev/null; }

# --- redis: server A (socket in /run, TCP, its files in the place), server B (socket in the place)
A="redis-cli -s /run/redis-a.sock"
B="redis-cli -s $P/redis-b.sock"
redis_a() { redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --unixsocket /run/redis-a.sock \
    --dir "$P/redis" --enable-debug-command yes --appendonly yes --save '' --logfile "$P/redis/log" --pidfile /run/redis-a.pid; }
check redis.start_a redis_a
check redis.ping_a wait_for sh -c "$A ping | grep -q PONG"
redis-server --daemonize yes --port 0 --unixsocket "$P/redis-b.sock" --unixsocketperm 777 --dir "$P/redis-b" \
    --save '' --logfile "$P/redis-b/log" --pidfile /run/redis-b.pid
check redis.ping_b_place_socket wait_for sh -c "$B ping | grep -q PONG"
same redis.socket_types stat -c '%n %F %a' /run/redis-a.sock redis-b.sock
same redis.tcp_ping redis-cli -h 127.0.0.1 -p 6379 ping
same redis.populate sh -c "$A debug populate $KEYS key 64 && $A dbsize"
same redis.types sh -c "$A rpush l a b c && $A sadd s x y && $A hset h f v && $A lrange l 0 -1 && $A type h"
same redis.digest $A debug digest
digest=$($A debug digest)
same redis.save sh -c "$A save && ls redis"
same redis.bgsave sh -c "$A bgsave && until [ \"\$($A info persistence | tr -d '\r' | grep ^rdb_bgsave_in_progress:)\" = rdb_bgsave_in_progress:0 ]; do sleep 0.1; done; $A info persistence | tr -d '\r' | grep ^rdb_last_bgsave_status"
same redis.aof_rewrite sh -c "$A bgrewriteaof >/dev/null && until [ \"\$($A info persistence | tr -d '\r' | grep ^aof_rewrite_in_progress:)\" = aof_rewrite_in_progress:0 ]; do sleep 0.1; done; $A info persistence | tr -d '\r' | grep -E '^aof_last_(bgrewrite|write)_status'"
same redis.check_rdb sh -c "redis-check-rdb redis/dump.rdb | grep -E 'RDB looks OK|Checking RDB file|keys read'"
same redis.check_aof sh -c "redis-check-aof redis/appendonlydir/appendonly.aof.manifest | tail -1"
$A set after-rewrite yes >/dev/null
pid=$(pidof_file /run/redis-a.pid)
same redis.shutdown $A shutdown
check redis.exited wait_for gone "$pid"
check redis.restart_a redis_a
check redis.ping_after_restart wait_for sh -c "$A ping | grep -q PONG"
same redis.reloaded sh -c "$A dbsize && $A get after-rewrite && $A lrange l 0 -1"
same redis.debug_reload sh -c "$A debug reload && $A dbsize"
check redis.benchmark_socket sh -c "redis-benchmark -s /run/redis-a.sock -n $REQS -c 4 -q -t set,get,lpush,incr | tee /dev/stderr | grep -c 'requests per second' | grep -qx 4"
check redis.benchmark_place_socket sh -c "redis-benchmark -s '$P/redis-b.sock' -n $REQS -c 4 -q -t set,get | tee /dev/stderr | grep -c 'requests per second' | grep -qx 2"
check redis.benchmark_tcp sh -c "redis-benchmark -h 127.0.0.1 -p 6379 -n $REQS -c 2 -q -t ping | grep -q 'requests per second'"
$A del after-rewrite >/dev/null
$A flushall >/dev/null
same redis.restore_digest sh -c "$A debug populate $KEYS key 64 >/dev/null; $A rpush l a b c >/dev/null; $A sadd s x y >/dev/null; $A hset h f v >/dev/null; test \"\$($A debug digest)\" = '$digest' && echo same digest"
for s in a b; do
    pid=$(pidof_file /run/redis-$s.pid)
    redis-cli -s "$([ $s = a ] && echo /run/redis-a.sock || echo "$P/redis-b.sock")" shutdown nosave >/dev/null 2>&1
    wait_for gone "$pid"
done
same redis.sockets_removed sh -c "ls /run/redis-a.sock redis-b.sock 2>&1 | sed 's/^ls: //'"

# --- nginx: serves the place to curl
mkdir -p www/list/sub 'www/with space' www/ünï
python3 -c 'import random, sys; sys.stdout.buffer.write(random.Random(1).randbytes(int(sys.argv[1]) << 20))' "$MIB" > www/big  # the same bytes under both runtimes
printf 'hello\n' > www/index.html
printf 'odd\n' > 'www/with space/a b.txt'
printf 'uni\n' > 'www/ünï/日本.txt'
printf 'secret\n' > www/private; chmod 0600 www/private
printf 'l\n' | tee 'www/list/a b' 'www/list/ünï' 'www/list/-x' 'www/list/q"s' >/dev/null
truncate -s 3M www/sparse
find www -exec touch -h -d '2021-02-03 04:05:06' {} +
cat > nginx/nginx.conf <<EOF
worker_processes 2;
pid /run/nginx-rsw.pid;
error_log $P/nginx/error.log;
events { worker_connections 64; }
http {
    include /etc/nginx/mime.types;
    access_log $P/nginx/access.log;
    client_body_temp_path $P/nginx/body;
    sendfile on;
    server {
        listen unix:/run/nginx-rsw.sock;
        listen unix:$P/nginx.sock;
        listen 127.0.0.1:8080;
        root $P/www;
        location / { autoindex on; }
    }
}
EOF
check nginx.configtest nginx -t -c "$P/nginx/nginx.conf"
check nginx.start nginx -c "$P/nginx/nginx.conf"
RUN="curl -sS --unix-socket /run/nginx-rsw.sock"
PLC="curl -sS --unix-socket $P/nginx.sock"
check nginx.up wait_for $RUN -f http://x/index.html
same nginx.index $RUN http://x/index.html
same nginx.big_sha sh -c "$RUN http://x/big | sha256sum; sha256sum < www/big"
same nginx.big_place_socket sh -c "$PLC http://x/big | sha256sum"
same nginx.big_tcp sh -c "curl -sS http://127.0.0.1:8080/big | sha256sum"
same nginx.sparse_sha sh -c "$RUN http://x/sparse | sha256sum"
same nginx.range sh -c "$RUN -r 1000-1999 http://x/big | sha256sum; dd if=www/big bs=1000 skip=1 count=1 status=none | sha256sum"
same nginx.head sh -c "$RUN -I http://x/big | tr -d '\r' | grep -E '^(HTTP|Content-Length|Last-Modified|ETag|Accept-Ranges)'"
same nginx.autoindex sh -c "$RUN http://x/list/ | grep -o 'href=\"[^\"]*\"'"
same nginx.odd_names sh -c "$RUN 'http://x/with%20space/a%20b.txt' && $RUN 'http://x/%C3%BCn%C3%AF/%E6%97%A5%E6%9C%AC.txt'"
same nginx.forbidden $RUN -o /dev/null -w '%{http_code}\n' http://x/private
same nginx.missing $RUN -o /dev/null -w '%{http_code}\n' http://x/nothing-here
same nginx.post_body sh -c "head -c 200000 /dev/zero | $RUN -o /dev/null -w '%{http_code}\n' --data-binary @- http://x/index.html"
check nginx.reload sh -c "nginx -c '$P/nginx/nginx.conf' -s reload && $RUN -f http://x/index.html"
printf 'changed\n' > www/index.html
same nginx.changed_file $RUN http://x/index.html
pid=$(pidof_file /run/nginx-rsw.pid)
check nginx.quit nginx -c "$P/nginx/nginx.conf" -s quit
check nginx.exited wait_for gone "$pid"
same nginx.access_log sh -c "wc -l < nginx/access.log; cut -d' ' -f6- nginx/access.log | sed 's/\"[^\"]*\"\$//' | head -3"
same nginx.place_socket_left stat -c '%F' nginx.sock

# --- memcached: a Unix socket in /tmp and TCP on loopback, through nc
check memcached.start memcached -d -u nobody -m 16 -s /tmp/mc.sock -a 0777 -P /tmp/mc.pid
check memcached.up wait_for test -S /tmp/mc.sock
mc() { printf "$1" | nc -N -U /tmp/mc.sock | tr -d '\r'; }
same memcached.set_get mc 'set k 0 0 5\r\nhello\r\nget k\r\nquit\r\n'
same memcached.incr mc 'set n 0 0 1\r\n7\r\nincr n 35\r\ndelete n\r\nget n\r\nquit\r\n'
same memcached.big sh -c "python3 -c \"import sys; v=b'x'*500000; sys.stdout.buffer.write(b'set big 0 0 %d\\r\\n' % len(v) + v + b'\\r\\nget big\\r\\nquit\\r\\n')\" | nc -N -U /tmp/mc.sock | wc -c"
pid=$(pidof_file /tmp/mc.pid)
kill "$pid"; wait_for gone "$pid"
check memcached.start_tcp memcached -d -u nobody -m 16 -l 127.0.0.1 -p 11211 -U 0 -P /tmp/mc.pid
check memcached.tcp_up wait_for sh -c "printf 'version\r\n' | nc -N 127.0.0.1 11211 | grep -q VERSION"
same memcached.tcp_set_get sh -c "printf 'set k 0 0 3\r\nabc\r\nget k\r\nquit\r\n' | nc -N 127.0.0.1 11211 | tr -d '\r'"
pid=$(pidof_file /tmp/mc.pid)
kill "$pid"; wait_for gone "$pid"
finish servers
