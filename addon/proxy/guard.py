"""The guard addon: who may name a principal, and what credential goes upstream.

It owns the trusted peers, the gateway secret (or its file), the principal source and
the key swap credential (``spendtap.proxy.trust``, ``spendtap.proxy.keyswap``), and
refuses to run unguarded: listening beyond loopback (or transparently) with principal
headers and no trust stated. It comes before the ledger in the addon list, so such a
start stops before any ledger file is created.
"""

from __future__ import annotations

from mitmproxy import ctx, exceptions
from mitmproxy.proxy.mode_specs import ProxyMode

from spendtap.proxy.failclosed import SpendtapAddon
from spendtap.proxy.keyswap import UpstreamCredential
from spendtap.proxy.trust import TrustPolicy, read_secret_file, unguarded_start


class Guard(SpendtapAddon):
    name = "spendtap-guard"
    OPTIONS = (
        "spendtap_trusted_peers",
        "spendtap_gateway_secret",
        "spendtap_gateway_secret_file",
        "spendtap_upstream_key_file",
        "spendtap_principal_source",
    )
    # mitmproxy's own options that decide whether the sidecar listens beyond loopback.
    LISTENING = ("mode", "listen_host")

    def __init__(self, fail_closed) -> None:
        super().__init__(fail_closed)
        self.policy = TrustPolicy.from_settings("", None)
        self.credential: UpstreamCredential | None = None
        self._configured = False

    def reconfigure(self, updated: set[str]) -> None:
        if self._configured and not updated & {*self.OPTIONS, *self.LISTENING}:
            return
        self.reload()
        self._configured = True

    def reload(self) -> None:
        """Read the settings and the secret files (at start, on a change, on SIGHUP).

        Raises ``OptionsError`` in one line; the previous policy and credential stay.
        """
        opts = ctx.options
        try:
            secret = opts.spendtap_gateway_secret or None
            if opts.spendtap_gateway_secret_file:
                if secret:
                    raise ValueError(
                        "set spendtap_gateway_secret or spendtap_gateway_secret_file, not both"
                    )
                secret = read_secret_file(
                    opts.spendtap_gateway_secret_file, "spendtap_gateway_secret_file"
                )
            policy = TrustPolicy.from_settings(opts.spendtap_trusted_peers, secret)
            credential = None
            if opts.spendtap_upstream_key_file:
                if opts.spendtap_principal_source == "headers":
                    raise ValueError(
                        "spendtap_upstream_key_file needs spendtap_principal_source bearer or "
                        "both (clients must present spendtap keys)"
                    )
                credential = UpstreamCredential(opts.spendtap_upstream_key_file)
        except ValueError as e:
            raise exceptions.OptionsError(str(e)) from None
        modes = list(opts.mode) if not isinstance(opts.mode, str) else [opts.mode]
        hosts, transparent = [], False
        for spec in modes:
            try:
                mode = ProxyMode.parse(spec)
            except ValueError:
                continue  # mitmproxy reports its own bad modes
            hosts.append(mode.listen_host(opts.listen_host))
            transparent = transparent or mode.type_name == "transparent"
        problem = unguarded_start(
            listen_hosts=hosts,
            transparent=transparent,
            principal_source=opts.spendtap_principal_source,
            policy=policy,
        )
        if problem is not None:
            raise exceptions.OptionsError(problem)
        self.policy = policy
        self.credential = credential
