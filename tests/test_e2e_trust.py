"""End to end: only trusted peers name a principal, a key pays for itself, key swap.

Real mitmdump processes in front of a recording upstream (``tests.recorder``),
real sockets. An untrusted peer is a client bound to 127.0.0.2 and a trusted one
a client bound to 127.0.0.1 (both loopback on Linux), with the sidecar told to
trust 127.0.0.1 only. Each test shows one of the attacks of issue 16 fail.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import time

import httpx
import openai
import pytest

from tests.helpers import (
    SPENDTAP_MODULE,
    anthropic_client,
    environ_without_spendtap,
    metric_value,
    openai_client,
    spendtap,
)
from tests.proc import Sidecar
from tests.recorder import USAGE_PROMPT, Recorder

pytestmark = pytest.mark.e2e

ACCOUNT_H, KEY_H = "x-helexa-account-id", "x-helexa-key-id"
VICTIM = {ACCOUNT_H: "victim", KEY_H: "vic-key"}
ATTACKER_SECRET = "sk-test-attacker-" + "a" * 32
OTHER_SECRET = "sk-test-other-" + "o" * 32
VICTIM_SECRET = "sk-test-victim-" + "v" * 32
TRUSTED, UNTRUSTED = "127.0.0.1", "127.0.0.2"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def client_from(address: str) -> httpx.Client:
    """An HTTP client whose connections come from ``address``."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=15)


def post(proxy: Sidecar, source: str, headers: dict, path: str = "/v1/chat/completions"):
    with client_from(source) as client:
        return client.post(proxy.url + path, json=CHAT, headers=headers)


@pytest.fixture
def upstream():
    rec = Recorder()
    yield rec
    rec.stop()


@pytest.fixture
def keyed_db(tmp_path):
    """A ledger with three registered keys; the attacker's has a 55-token balance, enough for
    one small request (a reservation of about 51 tokens) and not for a second."""
    db = tmp_path / "ledger.db"
    spendtap("keys", "add", "--account", "mallory", "--key-id", "mal-key", db=db,
             input=ATTACKER_SECRET)  # fmt: skip
    spendtap("keys", "add", "--account", "olive", "--key-id", "olive-key", db=db,
             input=OTHER_SECRET)  # fmt: skip
    spendtap("keys", "add", "--account", "victim", "--key-id", "vic-key", db=db,
             input=VICTIM_SECRET)  # fmt: skip
    spendtap("budget", "set", "--key", "mal-key", "--cap", "55", "--window", "balance", db=db)
    return db


def test_both_mode_untrusted_headers_cannot_spend_on_anothers_budget(
    upstream, keyed_db, start_sidecar
):
    """The issue's attacks, in `both` mode with require_auth: headers from an untrusted peer
    neither pass auth, nor escape a cap, nor reach the upstream; a key pays for itself;
    a trusted peer's headers still win."""
    proxy = start_sidecar(
        upstream.url,
        "spendtap_principal_source=both",
        "spendtap_require_auth=true",
        f"spendtap_trusted_peers={TRUSTED}",
        db=keyed_db,
        quiet=False,
    )
    # 1. No key, the victim's headers, from an untrusted peer: 401, nothing dispatched.
    r = post(proxy, UNTRUSTED, VICTIM)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert upstream.seen == []

    # 2. The attacker's key spends its balance on one request (8 tokens used).
    r = post(proxy, UNTRUSTED, {"authorization": f"Bearer {ATTACKER_SECRET}"})
    assert r.status_code == 200, r.text
    # Now over its cap: with the victim's headers it is still the attacker's key
    # that pays, and it is refused.
    r = post(proxy, UNTRUSTED, {"authorization": f"Bearer {ATTACKER_SECRET}", **VICTIM})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "insufficient_quota"
    assert len(upstream.seen) == 1

    # 3. Another valid key with the victim's headers from an untrusted peer: served,
    #    charged to that key, and the upstream never sees the victim's headers.
    r = post(proxy, UNTRUSTED, {"authorization": f"Bearer {OTHER_SECRET}", **VICTIM})
    assert r.status_code == 200, r.text
    forwarded = upstream.seen[-1]["headers"]
    assert ACCOUNT_H not in forwarded and KEY_H not in forwarded

    # 4. From the trusted peer, the gateway's headers win (as before).
    r = post(proxy, TRUSTED, {"authorization": f"Bearer {OTHER_SECRET}", **VICTIM})
    assert r.status_code == 200, r.text
    assert upstream.seen[-1]["headers"][ACCOUNT_H] == "victim"

    rows = proxy.rows(expect=5)
    by_outcome = [(r["account"], r["key"], r["outcome"]) for r in rows]
    assert by_outcome == [
        (None, None, "rejected"),
        ("mallory", "mal-key", "completed"),
        ("mallory", "mal-key", "rejected"),
        ("olive", "olive-key", "completed"),
        ("victim", "vic-key", "completed"),
    ]
    victim_rows = [r for r in rows if r["account"] == "victim"]
    assert [r["prompt_tokens"] for r in victim_rows] == [USAGE_PROMPT]
    # Three requests carried unvouched headers (1, the refused 2nd, 3).
    assert metric_value(proxy.metrics(), "cortex_untrusted_principal_headers_total", 0.0) == 3
    log = proxy.output()
    assert log.count(f"principal headers from untrusted peer {UNTRUSTED}") == 1


def test_headers_mode_spoofed_headers_are_stripped_and_anonymous(upstream, start_sidecar):
    """Default `headers` mode: an untrusted peer's principal headers are ignored (the row is
    anonymous, never charged) and removed before the request goes upstream."""
    proxy = start_sidecar(upstream.url, f"spendtap_trusted_peers={TRUSTED}")
    assert post(proxy, UNTRUSTED, VICTIM).status_code == 200
    assert post(proxy, TRUSTED, {ACCOUNT_H: "gw-acct", KEY_H: "gw-key"}).status_code == 200
    first, second = (s["headers"] for s in upstream.seen)
    assert ACCOUNT_H not in first and KEY_H not in first
    assert (second[ACCOUNT_H], second[KEY_H]) == ("gw-acct", "gw-key")
    rows = proxy.rows(expect=2)
    assert [(r["account"], r["key"]) for r in rows] == [(None, None), ("gw-acct", "gw-key")]
    assert 'spend_tokens_total{account="victim"' not in proxy.metrics()


def test_require_auth_headers_from_untrusted_peer_is_401(upstream, start_sidecar):
    """`require_auth` in headers mode: principal headers from an untrusted peer do not meet
    it (401, nothing dispatched); from the trusted peer they do."""
    proxy = start_sidecar(
        upstream.url, "spendtap_require_auth=true", f"spendtap_trusted_peers={TRUSTED}"
    )
    r = post(proxy, UNTRUSTED, VICTIM)
    assert r.status_code == 401 and upstream.seen == []
    assert post(proxy, TRUSTED, VICTIM).status_code == 200
    assert len(upstream.seen) == 1


def test_gateway_secret_right_wrong_missing_never_forwarded(upstream, tmp_path, start_sidecar):
    """With a gateway secret (from a file), headers count only with the right secret;
    the secret header never reaches the upstream, right or wrong."""
    secret = "gw-" + "s" * 40
    secret_file = tmp_path / "gateway-secret"
    secret_file.write_text(secret + "\n")
    proxy = start_sidecar(upstream.url, f"spendtap_gateway_secret_file={secret_file}")
    cases = [
        ({"x-spendtap-gateway-secret": secret, **VICTIM}, "victim"),
        ({"x-spendtap-gateway-secret": secret[:-1] + "x", **VICTIM}, None),
        (dict(VICTIM), None),
    ]
    for headers, _ in cases:
        # From 127.0.0.2 too: the secret alone vouches (no stable gateway address).
        assert post(proxy, UNTRUSTED, headers).status_code == 200
    rows = proxy.rows(expect=3)
    assert [r["account"] for r in rows] == [expected for _, expected in cases]
    for seen in upstream.seen:
        assert "x-spendtap-gateway-secret" not in seen["headers"]
    assert [ACCOUNT_H in s["headers"] for s in upstream.seen] == [True, False, False]
    assert secret not in proxy.output()


def test_gateway_secret_and_peers_both_must_hold(upstream, start_sidecar):
    """Peers and secret combined: the right secret from an untrusted peer does not count."""
    secret = "gw-" + "p" * 40
    proxy = start_sidecar(
        upstream.url,
        f"spendtap_gateway_secret={secret}",
        f"spendtap_trusted_peers={TRUSTED}",
    )
    headers = {"x-spendtap-gateway-secret": secret, **VICTIM}
    assert post(proxy, UNTRUSTED, headers).status_code == 200
    assert post(proxy, TRUSTED, headers).status_code == 200
    assert [r["account"] for r in proxy.rows(expect=2)] == [None, "victim"]


def test_ipv6_peers(upstream, tmp_path):
    """An IPv6 peer is matched against IPv6 entries: ::1 trusted when listed, not otherwise."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    for peers, expected in ((f"{TRUSTED},::1", "victim"), (TRUSTED, None)):
        proxy = Sidecar(
            tmp_path, upstream.url, f"spendtap_trusted_peers={peers}", listen_host="::1"
        )
        try:
            with httpx.Client(timeout=15) as client:
                r = client.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=VICTIM)
            assert r.status_code == 200, r.text
            assert [row["account"] for row in proxy.rows(expect=1)] == [expected]
        finally:
            proxy.stop()


def test_key_swap_openai_and_anthropic(upstream, keyed_db, tmp_path, start_sidecar):
    """Key swap: the upstream sees the operator's credential, never the client's, for both
    API shapes; an unknown key is refused before any swap; SIGHUP reloads the file."""
    operator = "sk-operator-" + "k" * 30
    key_file = tmp_path / "upstream-key"
    key_file.write_text(operator + "\n")
    proxy = start_sidecar(
        upstream.url,
        "spendtap_principal_source=bearer",
        f"spendtap_upstream_key_file={key_file}",
        db=keyed_db,
    )
    with openai_client(proxy.url, api_key=OTHER_SECRET) as client:
        client.chat.completions.create(**CHAT)
    with anthropic_client(proxy.url, api_key=OTHER_SECRET) as c:
        c.messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    openai_seen, anthropic_seen = (s["headers"] for s in upstream.seen)
    assert openai_seen["authorization"] == f"Bearer {operator}"
    assert "x-api-key" not in openai_seen
    assert anthropic_seen["x-api-key"] == operator
    assert "authorization" not in anthropic_seen
    for seen in upstream.seen:
        assert OTHER_SECRET not in repr(seen["headers"])

    with (
        openai_client(proxy.url, api_key="sk-unknown-" + "u" * 30) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.chat.completions.create(**CHAT)
    assert len(upstream.seen) == 2  # the unknown key never went upstream

    rotated = "sk-operator-rotated-" + "r" * 20
    key_file.write_text(rotated + "\n")
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    with openai_client(proxy.url, api_key=OTHER_SECRET) as client:
        while True:
            client.chat.completions.create(**CHAT)
            if upstream.seen[-1]["headers"]["authorization"] == f"Bearer {rotated}":
                break
            assert time.monotonic() < deadline, "SIGHUP did not reload the key file"
            time.sleep(0.1)
    assert proxy.proc.poll() is None  # SIGHUP reloads; it does not stop the sidecar
    rows = proxy.rows(expect=len(upstream.seen) + 1)
    assert [(r["key"], r["status"]) for r in rows[:3]] == [
        ("olive-key", 200),
        ("olive-key", 200),
        (None, 401),
    ]
    assert {(r["key"], r["status"]) for r in rows[3:]} == {("olive-key", 200)}
    log = proxy.output()
    assert operator not in log and rotated not in log and OTHER_SECRET not in log


def test_files_that_hold_spend_are_private_under_umask_000(upstream, tmp_path, start_sidecar):
    """The ledger, its -wal and -shm, and the access log are created 0600 even with umask 000."""
    log = tmp_path / "access.jsonl"
    db = tmp_path / "private.db"
    proxy = start_sidecar(upstream.url, f"spendtap_access_log={log}", db=db, umask=0)
    assert post(proxy, TRUSTED, {ACCOUNT_H: "a", KEY_H: "k"}).status_code == 200
    proxy.rows(expect=1)
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), log):
        assert path.exists(), path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, (path, oct(path.stat().st_mode))


def test_cli_created_ledger_is_private(tmp_path):
    """A ledger the CLI creates (keys add) is 0600 under umask 000 too."""
    db = tmp_path / "cli.db"
    old = os.umask(0)
    try:
        spendtap("keys", "add", "--account", "a", "--key-id", "k", db=db, input=OTHER_SECRET)
    finally:
        os.umask(old)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


# -- refusing to start unguarded -------------------------------------------------------


def _run(*args: str, env: dict | None = None, timeout: float = 30):
    return subprocess.run(
        [*SPENDTAP_MODULE, "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ_without_spendtap(), **(env or {})},
    )


def test_run_refuses_beyond_loopback_without_trust(tmp_path, upstream):
    """`spendtap run --listen 0.0.0.0:…` with principal headers and no trust stated exits 1
    with one line saying how to state it; with --trusted-peers it starts."""
    from spendtap.address import free_port

    port = free_port()
    out = _run("--upstream", upstream.url, "--listen", f"0.0.0.0:{port}",
               "--db", str(tmp_path / "l.db"), "--metrics", "")  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "--trusted-peers 10.0.0.5,10.1.0.0/16" in lines[0]
    assert "--trusted-peers any" in lines[0]
    transparent = _run("--mode", "transparent", "--dry-run")
    assert transparent.returncode == 1 and "transparent mode" in transparent.stderr

    proc = subprocess.Popen(
        [*SPENDTAP_MODULE, "run", "--upstream", upstream.url, "--listen", f"0.0.0.0:{port}",
         "--trusted-peers", TRUSTED, "--db", str(tmp_path / "l.db"), "--metrics", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        from spendtap.address import wait_for_port

        wait_for_port(port, proc)
        with client_from(UNTRUSTED) as client:
            r = client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT,
                            headers=VICTIM)  # fmt: skip
        assert r.status_code == 200
        assert ACCOUNT_H not in upstream.seen[-1]["headers"]
    finally:
        proc.terminate()
        proc.wait(15)


def test_mitmdump_refuses_beyond_loopback_without_trust(tmp_path):
    """Under `mitmdump -s`, listening on every interface with header principals and no trust
    stated stops mitmdump (exit 1) with the refusal in one line."""
    from tests.proc import ADDON, MITMDUMP

    out = subprocess.run(
        [str(MITMDUMP), "-q", "--mode", "reverse:http://127.0.0.1:9", "--listen-port", "0",
         "-s", str(ADDON), "--set", f"spendtap_db={tmp_path / 'l.db'}",
         "--set", "spendtap_metrics="],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    text = out.stdout + out.stderr
    (line,) = [x for x in text.splitlines() if "spendtap:" in x]
    assert re.search(r"refusing to start: listening on all interfaces", line), text
    assert "Traceback" not in text
