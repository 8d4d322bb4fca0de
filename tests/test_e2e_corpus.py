"""End to end: every recorded response, replayed through a real mitmdump.

The client must receive the recording byte for byte (compressed or not), and
the ledger row must carry the normalized figures the recording reports.
"""

from __future__ import annotations

import httpx
import pytest

from spendtap.metering.usage import INPUT_ONLY_APIS
from tests.corpus_cases import load_cases
from tests.replay_server import ReplayServer

pytestmark = pytest.mark.e2e

CASES = load_cases()


@pytest.fixture(scope="module")
def sidecar_upstream():
    """The module's sidecar (tests/conftest.py) proxies to a server replaying the corpus."""
    with ReplayServer() as replay:
        yield replay.url


@pytest.mark.parametrize("encoding", [None, "gzip", "br", "zstd", "deflate"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case_through_mitmdump(sidecar, case, encoding):
    """The client gets the recorded bytes unchanged and the ledger gets the recorded usage."""
    from tests.corpus_cases import encode

    account = f"{case.name}-{encoding or 'identity'}"
    headers = {"x-replay-case": case.name, "x-helexa-account-id": account, "x-helexa-key-id": "k"}
    if encoding:
        headers["x-replay-encoding"] = encoding
    wire = encode(case.body, encoding)[0] if encoding else case.body
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            sidecar.url + case.meta["request_path"],
            headers=headers,
            content=b'{"model": "recorded"}',
        ) as resp,
    ):
        got = b"".join(resp.iter_raw())
    assert resp.status_code == 200
    assert got == wire, "the client must receive the upstream's bytes unchanged"
    row = sidecar.row_for(account, settle=0)
    expected = case.expected_usage()
    if expected.reported:
        assert {k: row[k] for k in expected.as_dict()} == expected.as_dict()
        assert row["usage_source"] == "reported"
    elif "error-event" in case.name:
        assert row["usage_source"] == "none" and row["prompt_tokens"] is None
    elif case.api in INPUT_ONLY_APIS:
        # Nothing reported by an API that generates nothing: a prompt estimate only.
        assert row["usage_source"] == "estimated"
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] is None
    else:
        # Nothing reported: estimated from the request and the streamed content.
        assert row["usage_source"] == "estimated"
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
    assert row["api"] == case.api
    assert row["outcome"] == ("upstream_error" if "error-event" in case.name else "completed")
    assert row["response_bytes"] == len(wire)
