"""Key swap: clients hold spendtap keys, the upstream sees only the operator's credential.

With ``spendtap_upstream_key_file`` set, a request authenticated by a spendtap key
goes upstream with the operator's credential in place of the client's, so the
client's secret never leaves the sidecar and the provider's never reaches a
client. OpenAI-shaped APIs take ``Authorization: Bearer``; Anthropic's takes
``x-api-key``; Gemini's native API ``x-goog-api-key``. The other credential headers are
removed, so exactly one goes up.

The file is read at start and again on ``reload`` (SIGHUP); the credential is
never logged or shown (``repr`` hides it).

This module imports neither click nor mitmproxy.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from spendtap.metering.usage import ANTHROPIC_MESSAGES, GEMINI
from spendtap.proxy.trust import read_secret_file

OPTION = "spendtap_upstream_key_file"


class UpstreamCredential:
    def __init__(self, path: str):
        self.path = path
        self._secret = read_secret_file(path, OPTION)

    def reload(self) -> None:
        """Read the file again; on error the old credential stays (and ``ValueError``)."""
        self._secret = read_secret_file(self.path, OPTION)

    def apply(self, headers: MutableMapping[str, str], api: str) -> None:
        """Put the operator's credential in place of whatever the client presented."""
        anthropic = api == ANTHROPIC_MESSAGES or (
            "x-api-key" in headers and "authorization" not in headers
        )
        gemini = api == GEMINI
        for name in ("authorization", "x-api-key", "x-goog-api-key"):
            if name in headers:
                del headers[name]
        if gemini:
            headers["x-goog-api-key"] = self._secret
        elif anthropic:
            headers["x-api-key"] = self._secret
        else:
            headers["authorization"] = f"Bearer {self._secret}"

    def __repr__(self) -> str:
        return f"UpstreamCredential(path={self.path!r})"
