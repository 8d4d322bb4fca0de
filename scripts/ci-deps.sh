#!/usr/bin/env bash
# Install the Debian packages the deploy tests need, skipping what is present.
#   systemd    systemd-analyze verify   (tests/test_deploy_systemd.py)
#   prometheus promtool check/test      (tests/test_deploy_prometheus.py)
#   nftables   nft, transparent redirect (tests/test_transparent.py)
#   iptables   iptables fallback          (tests/test_transparent.py)
#   iproute2   ip netns, veth             (tests/test_transparent.py)
#   postgresql initdb, pg_ctl             (tests/pg.py: the fleet's central store)
# Idempotent and quiet: one line naming what it installs (apt's output only on
# failure), nothing when all are there. Needs root (CI runs as root); without root it says what is
# missing and exits 0, so the tests skip with that reason instead.
set -euo pipefail

declare -A tool_of=(
  [systemd]=systemd-analyze
  [prometheus]=promtool
  [nftables]=nft
  [iptables]=iptables
  [iproute2]=ip
  [postgresql]=initdb
)

missing=()
for pkg in systemd prometheus nftables iptables iproute2 postgresql; do
  tool=${tool_of[$pkg]}
  # Debian keeps PostgreSQL's server tools in /usr/lib/postgresql/VERSION/bin, off PATH.
  pgbin=$(compgen -G '/usr/lib/postgresql/*/bin' | tr '\n' ':' || true)
  if ! PATH="$PATH:/usr/sbin:/sbin:$pgbin" command -v "$tool" >/dev/null 2>&1; then
    missing+=("$pkg")
  fi
done

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "ci-deps: not root; missing packages: ${missing[*]} (the tests that need them skip)" >&2
  exit 0
fi

echo "ci-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-install-recommends: prometheus alone would otherwise pull in a web UI and more.
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
    >"$log" 2>&1; then
  cat "$log" >&2
  echo "ci-deps: apt-get failed" >&2
  exit 1
fi
