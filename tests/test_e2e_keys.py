"""End to end: bearer keys name the principal; unknown keys are refused; no secret is kept."""

from __future__ import annotations

import subprocess

import anthropic
import openai
import pytest

from tests.helpers import SPENDTAP_MODULE, sim_total
from tests.proc import Sidecar

pytestmark = pytest.mark.e2e


def test_bearer_keys_principal_and_require_auth(sim, tmp_path):
    """A registered key is metered as its account/key; an unknown one gets 401 and stays local."""
    db = tmp_path / "ledger.db"
    log = tmp_path / "access.jsonl"
    secret = "sk-test-" + "q" * 40
    added = subprocess.run(
        [*SPENDTAP_MODULE, "keys", "add", "--db", str(db),
         "--account", "acme", "--key-id", "acme-ci"],
        input=secret, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    proxy = Sidecar(
        tmp_path,
        sim.url,
        "spendtap_principal_source=bearer",
        "spendtap_require_auth=true",
        f"spendtap_access_log={log}",
        db=db,
    )
    try:
        before = sim_total(sim)
        with openai.OpenAI(base_url=proxy.url + "/v1", api_key=secret, max_retries=0) as client:
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-sim-tokens": "3"},
            )  # fmt: skip
        with anthropic.Anthropic(base_url=proxy.url, api_key=secret, max_retries=0) as client:
            client.messages.create(
                model="c", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
            )
        with (
            openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-wrong", max_retries=0) as client,
            pytest.raises(openai.AuthenticationError) as refused,
        ):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        assert refused.value.body["code"] == "invalid_api_key"
        with (
            anthropic.Anthropic(base_url=proxy.url, api_key="sk-wrong", max_retries=0) as client,
            pytest.raises(anthropic.AuthenticationError) as refused,
        ):
            client.messages.create(
                model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
        assert refused.value.body["error"]["type"] == "authentication_error"
        assert sim_total(sim) - before == 2
        rows = proxy.rows(expect=4)
        served = [r for r in rows if r["outcome"] == "completed"]
        assert {(r["account"], r["key"]) for r in served} == {("acme", "acme-ci")}
        assert sorted(r["status"] for r in rows if r["outcome"] == "rejected") == [401, 401]
    finally:
        proxy.stop()
    for path in [db, *tmp_path.glob("ledger.db-*"), log, *tmp_path.glob("mitmdump-*.log")]:
        if path.exists():
            assert secret.encode() not in path.read_bytes(), f"the secret leaked into {path}"
            assert b"sk-wrong" not in path.read_bytes(), f"a rejected secret leaked into {path}"
