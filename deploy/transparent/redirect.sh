#!/usr/bin/env bash
# Transparent interposition: redirect TCP for an inference port on this host to spendtap.
#
#   redirect.sh add    --port 8000 --proxy-port 8080 [--proxy-user spendtap] [--backend auto|nft|iptables]
#   redirect.sh remove [--backend auto|nft|iptables]
#   redirect.sh status [--backend auto|nft|iptables]
#
# Clients keep talking to HOST:PORT (the inference server's real address and
# port); the kernel hands those connections to spendtap listening on
# --proxy-port in `--mode transparent`, which reads the original destination
# (SO_ORIGINAL_DST) and forwards to it. Two rules, both for destinations that
# are addresses of this host only (the sidecar sits on the server's host):
#
#   prerouting  connections arriving from other hosts        -> REDIRECT to :proxy-port
#   output      connections made on this host, except those of
#               --proxy-user (spendtap's own upstream connections,
#               which would otherwise loop back into itself)  -> REDIRECT to :proxy-port
#
# nftables (table `inet spendtap`) when `nft` is there, else iptables/ip6tables
# (nat chains SPENDTAP_PRE and SPENDTAP_OUT, jumped to from PREROUTING/OUTPUT).
# Every rule lives in spendtap's own table or chains, so `remove` deletes exactly
# what `add` created and nothing else. `add` replaces an earlier `add`.
# Exit status: 0 ok; 1 failure; 2 usage; `status` exits 3 when no rule is installed.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

TABLE=spendtap
PRE=SPENDTAP_PRE
OUT=SPENDTAP_OUT

usage() {
  sed -n '4,6p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() { echo "redirect.sh: $*" >&2; exit 1; }

[ $# -ge 1 ] || usage
action=$1
shift
port="" proxy_port="" proxy_user=spendtap backend=auto
while [ $# -gt 0 ]; do
  case $1 in
    --port) port=${2:-}; shift 2 ;;
    --proxy-port) proxy_port=${2:-}; shift 2 ;;
    --proxy-user) proxy_user=${2:-}; shift 2 ;;
    --backend) backend=${2:-}; shift 2 ;;
    -h|--help) usage ;;
    *) echo "redirect.sh: unknown argument: $1" >&2; usage ;;
  esac
done

is_port() { [[ $1 =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }

case $backend in
  auto)
    if command -v nft >/dev/null 2>&1; then backend=nft
    elif command -v iptables >/dev/null 2>&1; then backend=iptables
    else die "neither nft nor iptables is installed"
    fi ;;
  nft|iptables) command -v "$backend" >/dev/null 2>&1 || die "$backend is not installed" ;;
  *) die "--backend must be auto, nft or iptables, got '$backend'" ;;
esac

# -- nftables -------------------------------------------------------------------

nft_add() {
  nft_remove
  nft -f - <<NFT
table inet $TABLE {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local tcp dport $port redirect to :$proxy_port comment "spendtap: remote clients"
  }
  chain output {
    type nat hook output priority -100; policy accept;
    meta skuid $uid return comment "spendtap: the proxy's own traffic never loops"
    fib daddr type local tcp dport $port redirect to :$proxy_port comment "spendtap: local clients"
  }
}
NFT
}

nft_remove() { nft list table inet $TABLE >/dev/null 2>&1 && nft delete table inet $TABLE || true; }
nft_status() { nft list table inet $TABLE 2>/dev/null; }

# -- iptables (and ip6tables when present) ------------------------------------------

ipt_families() {
  echo iptables
  command -v ip6tables >/dev/null 2>&1 && ip6tables -t nat -L -n >/dev/null 2>&1 && echo ip6tables
  return 0
}

ipt_add() {
  ipt_remove
  local ipt
  for ipt in $(ipt_families); do
    $ipt -t nat -N $PRE
    $ipt -t nat -A $PRE -p tcp --dport "$port" -m addrtype --dst-type LOCAL \
      -j REDIRECT --to-ports "$proxy_port" -m comment --comment "spendtap: remote clients"
    $ipt -t nat -N $OUT
    $ipt -t nat -A $OUT -m owner --uid-owner "$uid" -j RETURN \
      -m comment --comment "spendtap: the proxy's own traffic never loops"
    $ipt -t nat -A $OUT -p tcp --dport "$port" -m addrtype --dst-type LOCAL \
      -j REDIRECT --to-ports "$proxy_port" -m comment --comment "spendtap: local clients"
    $ipt -t nat -I PREROUTING -j $PRE
    $ipt -t nat -I OUTPUT -j $OUT
  done
}

ipt_remove() {
  local ipt chain hook
  for ipt in $(ipt_families); do
    for pair in PREROUTING:$PRE OUTPUT:$OUT; do
      hook=${pair%%:*} chain=${pair#*:}
      while $ipt -t nat -D "$hook" -j "$chain" 2>/dev/null; do :; done
      if $ipt -t nat -L "$chain" -n >/dev/null 2>&1; then
        $ipt -t nat -F "$chain"
        $ipt -t nat -X "$chain"
      fi
    done
  done
}

ipt_status() {
  local ipt found=1
  for ipt in $(ipt_families); do
    if $ipt -t nat -S $PRE >/dev/null 2>&1; then
      $ipt -t nat -S $PRE
      $ipt -t nat -S $OUT
      found=0
    fi
  done
  return $found
}

# -- main ---------------------------------------------------------------------

fn=nft
[ "$backend" = iptables ] && fn=ipt

case $action in
  add)
    is_port "$port" || die "--port must be a TCP port (1-65535), got '$port'"
    is_port "$proxy_port" || die "--proxy-port must be a TCP port (1-65535), got '$proxy_port'"
    [ "$port" != "$proxy_port" ] || die "--port and --proxy-port must differ"
    # A numeric uid or a user name that exists: without it the proxy's own
    # upstream connections would be redirected back into the proxy.
    if [[ $proxy_user =~ ^[0-9]+$ ]]; then uid=$proxy_user
    else uid=$(id -u "$proxy_user" 2>/dev/null) || die "no such user: '$proxy_user' (--proxy-user)"
    fi
    [ "$uid" != 0 ] || die "--proxy-user must not be root: every root connection would bypass spendtap"
    "${fn}_add"
    echo "redirect.sh: tcp/$port on this host -> :$proxy_port (except uid $uid) via $backend"
    ;;
  remove) "${fn}_remove" ;;
  status)
    if ! "${fn}_status"; then echo "redirect.sh: no spendtap redirect installed ($backend)"; exit 3; fi ;;
  *) usage ;;
esac
