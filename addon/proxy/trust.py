"""Whose principal headers count: trusted peers and the gateway's shared secret.

A gateway in front of spendtap (helexa's cortex) names each request's principal in
headers. Anyone who can open a connection can send the same headers, so they count
only when the operator vouched for the sender, the way nginx honours ``X-Real-IP``
only from ``set_real_ip_from`` addresses:

- the TCP peer is in ``trusted_peers`` (addresses and CIDRs, or ``any``); when the
  operator states nothing, loopback is trusted, or any peer if a secret is set;
- and, when a gateway secret is set, the request carries it in
  ``x-spendtap-gateway-secret`` (compared in constant time).

Both must hold. The secret header never goes upstream, and unvouched principal
headers are removed before the request is dispatched (the hook layer does that).

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

GATEWAY_SECRET_HEADER = "x-spendtap-gateway-secret"
ANY = "any"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
MIN_SECRET_LEN = 16
# Peers whose verdict a policy remembers: a gateway's few addresses are parsed once, not
# on every request (``ipaddress`` takes 5-13 µs a request); a scan of many addresses
# starts the memory afresh rather than growing it.
PEER_VERDICTS_MAX = 4096


def parse_trusted_peers(spec: str) -> tuple[Network, ...] | None:
    """``"10.0.0.5, 10.1.0.0/16, ::1"`` to networks; ``"any"`` to None (everyone).

    An empty spec is an empty tuple (the caller picks the default). Raises
    ``ValueError`` naming the bad entry.
    """
    spec = spec.strip()
    if spec.lower() == ANY:
        return None
    networks: list[Network] = []
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry.lower() == ANY:
            raise ValueError("'any' cannot be combined with addresses")
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise ValueError(
                f"expected addresses and CIDRs separated by commas, or 'any', got {entry!r}"
            ) from None
    return tuple(networks)


def peer_address(peer: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address as an IP (an IPv4-mapped IPv6 address as IPv4), or None."""
    if not peer:
        return None
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_host(host: str) -> bool:
    """Whether a listen host accepts loopback clients only ("" and 0.0.0.0 do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret_file(path: str, what: str) -> str:
    """The first line of a secret file, stripped; ``ValueError`` in one line if unusable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: cannot read: {getattr(e, 'strerror', e)}") from None
    secret = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ValueError(f"{what} {path}: the file is empty")
    return secret


@dataclass(frozen=True)
class TrustPolicy:
    """Which requests may name their own principal in headers."""

    peers: tuple[Network, ...] | None  # None: any peer
    secret: str | None = None
    stated: bool = False  # the operator said something (peers or a secret)
    _verdicts: dict[str | None, bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @classmethod
    def from_settings(cls, peers_spec: str, secret: str | None) -> TrustPolicy:
        secret = secret or None
        if secret is not None and len(secret) < MIN_SECRET_LEN:
            raise ValueError(f"the gateway secret must be at least {MIN_SECRET_LEN} characters")
        peers = parse_trusted_peers(peers_spec)
        stated = bool(peers_spec.strip()) or secret is not None
        if peers == ():
            # Nothing stated: loopback. A secret alone vouches from any address
            # (gateways behind NAT or autoscaling have no stable one).
            peers = None if secret is not None else LOOPBACK
        return cls(peers=peers, secret=secret, stated=stated)

    def trusts_peer(self, peer: str | None) -> bool:
        if self.peers is None:
            return True
        verdict = self._verdicts.get(peer)
        if verdict is None:
            verdict = self._judge(peer)
            if len(self._verdicts) >= PEER_VERDICTS_MAX:
                self._verdicts.clear()
            self._verdicts[peer] = verdict
        return verdict

    def _judge(self, peer: str | None) -> bool:
        address = peer_address(peer)
        if address is None:
            return False
        return any(address.version == n.version and address in n for n in self.peers)

    def vouches(self, peer: str | None, headers: Mapping[str, str]) -> bool:
        """Whether this request's principal headers count."""
        if not self.trusts_peer(peer):
            return False
        if self.secret is None:
            return True
        presented = headers.get(GATEWAY_SECRET_HEADER) or ""
        return hmac.compare_digest(presented.encode("utf-8"), self.secret.encode("utf-8"))

    def describe(self) -> str:
        """What is trusted, in words (never the secret)."""
        if self.peers is None:
            who = "any peer"
        elif self.peers == LOOPBACK:
            who = "loopback peers"
        else:
            who = "peers " + ", ".join(str(n) for n in self.peers)
        return who + (" with the gateway secret" if self.secret else "")


def unguarded_start(
    *,
    listen_hosts: list[str],
    transparent: bool,
    principal_source: str,
    policy: TrustPolicy,
) -> str | None:
    """Why the sidecar must not start (one line), or None.

    Listening beyond loopback (or in transparent mode, where every client on the
    network is redirected here) while taking principals from headers, with no
    trust stated, would let any client name who pays: refuse, and say how to state it.
    """
    if principal_source not in ("headers", "both") or policy.stated:
        return None
    exposed = [host or "all interfaces" for host in listen_hosts if not is_loopback_host(host)]
    if transparent:
        where = "in transparent mode"
    elif exposed:
        where = f"on {exposed[0]}, beyond loopback,"
    else:
        return None
    return (
        f"refusing to start: listening {where} with principal headers "
        f"(principal source {principal_source}) and no trusted peers stated; say who may "
        f"name a principal: --trusted-peers 10.0.0.5,10.1.0.0/16 "
        f"(spendtap_trusted_peers), --trusted-peers any to trust the network, "
        f"or a gateway secret (spendtap_gateway_secret_file)"
    )
