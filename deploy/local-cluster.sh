#!/usr/bin/env bash
# A clustered deployment on one machine, to see it work and to break it on purpose:
#   - a 3-node JetStream cluster (nats-server on 127.0.0.1:4231-4233, routes on 6231-6233),
#     room streams replicated 3 times (CHAT_REPLICAS=3);
#   - two chatd nodes (CHAT_ROLE=all) on 127.0.0.1:8081 and :8082, each with its own embedded
#     store that it projects every room into, sharing one HS256 secret: a client can connect to
#     either, typing and presence cross between them, and either serves any room's history.
#
# Usage: deploy/local-cluster.sh [DIR]   (state in DIR, default ./data/cluster; Ctrl-C stops all)
# It builds chatd first (cargo build --release) and uses fixed ports: NATS 4231-4233, routes
# 6231-6233, monitoring 8231-8233, chatd 8081-8082.
# Tokens: the command it prints when ready (one HS256 secret, DIR/secret: valid on both nodes).
# Things to try: kill one nats-server (`kill $(cat DIR/n2/pid)`): appends go on with two of
# three, and the command printed when ready brings it back; kill -9 one chatd: its clients reconnect to the other and resume by sequence, and its
# users go offline there within CHAT_PRESENCE_TIMEOUT.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=$(mkdir -p "${1:-$root/data/cluster}" && cd "${1:-$root/data/cluster}" && pwd)
nats_bin=$(bash "$root/nats/install-nats-server.sh")
cargo build --release -q -p chatd --manifest-path "$root/Cargo.toml"
chatd="$root/target/release/chatd"

nats_pids=()
chatd_pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping" >&2
  # chatd nodes first, and until they have drained (their acks need NATS), then the cluster.
  for pid in "${chatd_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${chatd_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  for pid in "${nats_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # Nodes restarted by hand (with the command printed when ready) are this cluster's too.
  pkill -TERM -f -- "-c $dir/n[123]/nats.conf" 2>/dev/null || true
  wait || true
}
trap stop INT TERM EXIT

routes="nats-route://127.0.0.1:6231, nats-route://127.0.0.1:6232, nats-route://127.0.0.1:6233"
for i in 1 2 3; do
  mkdir -p "$dir/n$i"
  cat > "$dir/n$i/nats.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:423$i
http: 127.0.0.1:823$i
jetstream { store_dir: "$dir/n$i/jetstream", sync_interval: always }
cluster { name: chat-local, listen: 127.0.0.1:623$i, routes: [ $routes ] }
EOF
  "$nats_bin" -c "$dir/n$i/nats.conf" > "$dir/n$i/nats.log" 2>&1 &
  nats_pids+=($!)
  echo $! > "$dir/n$i/pid"
done

# JetStream is ready once the cluster has a meta leader.
js_ready() {
  curl -fs "http://127.0.0.1:8231/healthz?js-enabled-only=true" > /dev/null 2>&1 &&
    curl -fs "http://127.0.0.1:8231/jsz" 2>/dev/null | grep -q '"leader"'
}
for _ in $(seq 1 100); do
  js_ready && break
  sleep 0.2
done
js_ready ||
  { echo "the NATS cluster elected no JetStream leader in 20 s; see $dir/n*/nats.log" >&2; exit 1; }

secret_file="$dir/secret"
[ -s "$secret_file" ] || head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$secret_file"
for i in 1 2; do
  mkdir -p "$dir/chatd-$i"
  CHAT_ROLE=all \
  CHAT_LISTEN="127.0.0.1:808$i" \
  CHAT_DATA_DIR="$dir/chatd-$i" \
  NATS_URL="nats://127.0.0.1:4231,nats://127.0.0.1:4232,nats://127.0.0.1:4233" \
  CHAT_REPLICAS=3 \
  CHAT_JWT_HS256_SECRET="$(cat "$secret_file")" \
  CHAT_JWT_ISSUER=chat-dev CHAT_JWT_AUDIENCE=chat-dev \
    "$chatd" run > "$dir/chatd-$i/chatd.log" 2>&1 &
  chatd_pids+=($!)
  echo $! > "$dir/chatd-$i/pid"
done

for i in 1 2; do
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:808$i/readyz" > /dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fs "http://127.0.0.1:808$i/readyz" > /dev/null ||
    { echo "chatd-$i did not become ready; see $dir/chatd-$i/chatd.log" >&2; exit 1; }
done

cat >&2 <<EOF
ready: chatd-1 http://127.0.0.1:8081  chatd-2 http://127.0.0.1:8082  (NATS 4231-4233)
tokens: CHAT_JWT_HS256_SECRET=\$(cat $dir/secret) CHAT_JWT_ISSUER=chat-dev CHAT_JWT_AUDIENCE=chat-dev $chatd token alice
logs: $dir/*/*.log   (Ctrl-C stops everything)
a killed nats-server comes back with: $nats_bin -c $dir/n2/nats.conf >> $dir/n2/nats.log 2>&1 &   (n1, n2 or n3)
EOF
# Until Ctrl-C: a process that ends (killed on purpose, or failed) leaves the others running.
wait || true
