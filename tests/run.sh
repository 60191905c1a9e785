#!/usr/bin/env bash
# The README's Test command: installs everything the tests need on a fresh Debian machine with Python,
# then runs the whole suite. Safe to re-run: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${MCPHERD_TOOLS:-$HOME/.cache/mcpherd-tools}"
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v wrk >/dev/null || need_apt+=(wrk)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v systemd-socket-activate >/dev/null || need_apt+=(systemd)
command -v npm >/dev/null || need_apt+=(npm)
command -v ip >/dev/null || need_apt+=(iproute2)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

# Node 22 (the conformance suite 0.1.16 imports fs.globSync) and both suite versions, from npm.
install_npm() {  # dir package
  [ -f "$tools/$1/package-lock.json" ] && [ -d "$tools/$1/node_modules" ] && return 0
  mkdir -p "$tools/$1"
  (cd "$tools/$1" && npm install --silent --no-audit --no-fund "$2" >/dev/null)
}
install_npm node22 node@22
install_npm conformance-0.1.16 @modelcontextprotocol/conformance@0.1.16
install_npm conformance-0.2.0 @modelcontextprotocol/conformance@0.2.0-alpha.12
export MCPHERD_TOOLS="$tools"

exec python3 -m pytest "$@"
