#!/usr/bin/env bash
# Prints the path of a nats-server >= 2.10, installing one if needed.
#
# Order of preference:
#   1. $NATS_SERVER_BIN, if set and new enough;
#   2. a nats-server on PATH, if new enough;
#   3. the project-local copy in .tools/nats-server/ (installed earlier by this script);
#   4. otherwise Debian 13 ("trixie") ships 2.10.x: download its package with a private apt
#      configuration (the mirror URI is read from this machine's own apt sources) and unpack it
#      into .tools/nats-server/. No root-owned state changes; nothing outside the project is written.
#
# Progress goes to stderr; the only stdout line is the binary's path.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="$root/.tools"
local_bin="$tools/nats-server/usr/sbin/nats-server"
min_major=2
min_minor=10

log() { echo "nats-server: $*" >&2; }

new_enough() {
  local bin=$1 v
  v=$("$bin" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -n1) || return 1
  [ -n "$v" ] || return 1
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  [ "$major" -gt "$min_major" ] || { [ "$major" -eq "$min_major" ] && [ "$minor" -ge "$min_minor" ]; }
}

if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "$NATS_SERVER_BIN" ] && new_enough "$NATS_SERVER_BIN"; then
  echo "$NATS_SERVER_BIN"; exit 0
fi
if on_path=$(command -v nats-server 2>/dev/null) && new_enough "$on_path"; then
  echo "$on_path"; exit 0
fi
if [ -x "$local_bin" ] && new_enough "$local_bin"; then
  echo "$local_bin"; exit 0
fi

# The mirror this machine already uses, from its deb822 or one-line sources.
mirror=""
if [ -r /etc/apt/sources.list.d/debian.sources ]; then
  mirror=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
    /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
    /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
  log "cannot install: no nats-server >= $min_major.$min_minor on PATH and no Debian mirror found in /etc/apt/sources*."
  log "install nats-server 2.10 or newer yourself, or set NATS_SERVER_BIN to one."
  exit 1
fi
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { log "cannot install: $tool is missing (set NATS_SERVER_BIN to a nats-server >= 2.10)"; exit 1; }
done

log "installing Debian trixie's nats-server from $mirror into $tools/nats-server"
apt_dir="$tools/apt"
rm -rf "$apt_dir" "$tools/nats-server"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/sources.list.d" "$apt_dir/preferences.d" "$tools/nats-server"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" >"$apt_dir/sources.list"
: >"$apt_dir/status"
apt_opts=(
  -o "Dir::Etc::SourceList=$apt_dir/sources.list"
  -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
  -o "Dir::Etc::Preferences=$apt_dir/preferences"
  -o "Dir::Etc::PreferencesParts=$apt_dir/preferences.d"
  -o "Dir::State=$apt_dir"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::State::status=$apt_dir/status"
  -o "Dir::Cache=$apt_dir"
  -o "Dir::Cache::Archives=$apt_dir/archives"
  -o "APT::Get::List-Cleanup=0"
  -o "Debug::NoLocking=1"
  -o "APT::Sandbox::User=root"
)
if ! apt-get "${apt_opts[@]}" -qq update >&2; then
  log "cannot install: 'apt-get update' of trixie from $mirror failed (see above)"
  exit 1
fi
(cd "$apt_dir/archives" && apt-get "${apt_opts[@]}" -qq download nats-server >&2) || {
  log "cannot install: 'apt-get download nats-server' failed (see above)"
  exit 1
}
deb=$(ls "$apt_dir"/archives/nats-server_*.deb | head -n1)
dpkg-deb -x "$deb" "$tools/nats-server"
rm -rf "$apt_dir"
if [ -x "$local_bin" ] && new_enough "$local_bin"; then
  log "installed $("$local_bin" --version)"
  echo "$local_bin"
else
  log "cannot install: the unpacked package has no usable nats-server at $local_bin"
  exit 1
fi
