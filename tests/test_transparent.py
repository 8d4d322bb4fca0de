"""Transparent mode end to end: a firewall redirect meters traffic with no client or server change.

Topology, all inside network namespaces this test creates (nothing leaves the machine)::

    client ns  10.213.77.1/24 --veth-- 10.213.77.2/24  server ns
                                                       simulated server 0.0.0.0:8000 (root)
                                                       spendtap run --mode transparent :8080
                                                         (as uid 65534, the "proxy user")
                                                       deploy/transparent/redirect.sh rules

The client always connects to the server's real address and port, 10.213.77.2:8000.
With the rule installed, the kernel hands the connection to spendtap, which reads the
original destination (SO_ORIGINAL_DST) and forwards to it; its own upstream connection
is exempt by uid, so it reaches the real server instead of looping. Without the rule,
the same client reaches the server directly and nothing is metered.

spendtap runs as uid 65534 (nobody) so the owner match has a uid to exempt. This
checkout's Python may live under /root (mode 0700, a pyenv install): the proxy process
gets CAP_DAC_READ_SEARCH as an ambient capability so it can reach the interpreter,
and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import SPENDTAP_SCRIPT
from tests.proc import REPO, Proc, read_rows

pytestmark = pytest.mark.e2e

REDIRECT = REPO / "deploy" / "transparent" / "redirect.sh"
CLIENT_IP, SERVER_IP = "10.213.77.1", "10.213.77.2"
SERVER_PORT, PROXY_PORT = 8000, 8080
PROXY_UID = 65534
TAG = f"{os.getpid() % 100000}"
CLIENT_NS, SERVER_NS = f"spt-c-{TAG}", f"spt-s-{TAG}"
# ip, nft and iptables live in sbin, which a CI environment's PATH may lack.
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])

CLIENT = r"""
import json, sys, urllib.request
url, account = sys.argv[1], sys.argv[2]
body = json.dumps({"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}],
                   "stream": True, "stream_options": {"include_usage": True}}).encode()
req = urllib.request.Request(url, body, {"content-type": "application/json",
                                         "x-helexa-account-id": account})
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(req, timeout=20) as resp:
    data = resp.read().decode()
print(json.dumps({"status": resp.status, "done": "data: [DONE]" in data}))
"""


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": PATH}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def netns_connect(ns: str, host: str, port: int) -> bool:
    """Whether a TCP connect to host:port succeeds from inside namespace ``ns``."""
    result = []

    def attempt() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            os.setns(fd, os.CLONE_NEWNET)  # this thread only
        finally:
            os.close(fd)
        try:
            with socket.create_connection((host, port), 0.5):
                result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=attempt)
    t.start()
    t.join()
    return result == [True]


def wait_listening(ns: str, host: str, port: int, proc: Proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        if netns_connect(ns, host, port):
            return
        time.sleep(0.1)
    raise AssertionError(f"nothing listening on {host}:{port} in {ns}:\n{proc.output()[-3000:]}")


def wait_for_log(proc: Proc, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.output():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} from the process:\n{proc.output()[-3000:]}")
        time.sleep(0.1)


def skip_unless_possible() -> None:
    if sys.platform != "linux":
        pytest.skip("transparent mode rules are Linux-only")
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces and firewall rules")
    if shutil.which("ip", path=PATH) is None:
        pytest.skip("iproute2 not installed (scripts/ci-deps.sh installs it)")
    if shutil.which("setpriv", path=PATH) is None:
        pytest.skip("setpriv (util-linux) not installed")
    probe = f"spt-probe-{TAG}"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"the kernel refuses network namespaces: {made.stderr.strip()}")
    sh("ip", "netns", "del", probe, check=False)


@pytest.fixture(scope="module")
def topology():
    """Client and server namespaces joined by a veth pair; always torn down."""
    skip_unless_possible()
    workdir = Path(tempfile.mkdtemp(prefix="spendtap-transparent-"))
    procs: list[Proc] = []
    try:
        sh("ip", "netns", "add", CLIENT_NS)
        sh("ip", "netns", "add", SERVER_NS)
        veth_c, veth_s = f"sptc{TAG}", f"spts{TAG}"
        sh("ip", "link", "add", veth_c, "type", "veth", "peer", "name", veth_s)
        sh("ip", "link", "set", veth_c, "netns", CLIENT_NS)
        sh("ip", "link", "set", veth_s, "netns", SERVER_NS)
        for ns, dev, ip in ((CLIENT_NS, veth_c, CLIENT_IP), (SERVER_NS, veth_s, SERVER_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

        # The real upstream: the built-in simulated server, as root, on all addresses.
        sim = Proc(
            ["ip", "netns", "exec", SERVER_NS, sys.executable, "-m", "spendtap.sim",
             "--listen", f"0.0.0.0:{SERVER_PORT}"],
            workdir / "sim.log",
            env={"PATH": PATH},
        )  # fmt: skip
        procs.append(sim)
        wait_listening(SERVER_NS, SERVER_IP, SERVER_PORT, sim)

        # spendtap, started the way operators do (`spendtap run`), as the proxy user.
        state = workdir / "state"
        state.mkdir()
        os.chown(state, PROXY_UID, PROXY_UID)
        workdir.chmod(0o755)
        db = state / "ledger.db"
        env = {
            "PATH": PATH,
            "HOME": str(state),
            "SPENDTAP_MODE": "transparent",
            "SPENDTAP_LISTEN": f"0.0.0.0:{PROXY_PORT}",
            "SPENDTAP_DB": str(db),
            "SPENDTAP_METRICS": "127.0.0.1:9464",
            # Both clients name their account by header; a transparent listener must say
            # whose word it takes (the veth subnet here), or spendtap refuses to start.
            "SPENDTAP_TRUSTED_PEERS": "10.213.77.0/24",
        }
        proxy = Proc(
            ["ip", "netns", "exec", SERVER_NS,
             "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups",
             "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search",
             str(SPENDTAP_SCRIPT), "run"],
            workdir / "spendtap.log",
            env=env,
        )  # fmt: skip
        procs.append(proxy)
        # Not a probe connection to the proxy port: a connection that was not redirected
        # has no original destination, and mitmdump treats that error at start as fatal.
        wait_for_log(proxy, "Transparent Proxy listening at")
        wait_listening(SERVER_NS, "127.0.0.1", 9464, proxy)
        yield {"db": db, "proxy": proxy, "sim": sim}
    finally:
        for backend in ("nft", "iptables"):
            if shutil.which(backend, path=PATH):
                sh("ip", "netns", "exec", SERVER_NS, str(REDIRECT), "remove",
                   "--backend", backend, check=False)  # fmt: skip
        for p in reversed(procs):
            p.stop()
        sh("ip", "netns", "del", CLIENT_NS, check=False)
        sh("ip", "netns", "del", SERVER_NS, check=False)  # takes the veth pair with it
        shutil.rmtree(workdir, ignore_errors=True)
    assert CLIENT_NS not in sh("ip", "netns", "list").stdout


def client(ns: str, account: str) -> dict:
    """One streamed chat request to the server's real address, from namespace ``ns``."""
    proc = in_ns(
        ns, sys.executable, "-c", CLIENT, f"http://{SERVER_IP}:{SERVER_PORT}/v1/chat/completions",
        account,
    )  # fmt: skip
    return json.loads(proc.stdout)


def sim_total() -> int:
    proc = in_ns(
        SERVER_NS, sys.executable, "-c",
        "import urllib.request as u;"
        f"print(u.build_opener(u.ProxyHandler({{}})).open('http://127.0.0.1:{SERVER_PORT}"
        "/sim/stats').read().decode())",
    )  # fmt: skip
    return json.loads(proc.stdout)["total"]


def rows_for(db: Path, account: str, wait: float) -> list[dict]:
    deadline = time.monotonic() + wait
    while True:
        rows = [r for r in read_rows(db) if r["account"] == account]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def redirect(action: str, backend: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [str(REDIRECT), action, "--backend", backend]
    if action == "add":
        args += ["--port", str(SERVER_PORT), "--proxy-port", str(PROXY_PORT),
                 "--proxy-user", str(PROXY_UID)]  # fmt: skip
    return in_ns(SERVER_NS, *args, check=check)


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_redirect_meters_without_client_or_server_change(topology, backend):
    """With the rule, a remote client's and a local client's requests to the server's own
    address are metered (a row each, usage reported) and reach the server exactly once each
    (the proxy's own connection is exempt, so no loop); after `remove`, the same client
    reaches the server directly and nothing new is metered."""
    if shutil.which(backend, path=PATH) is None:
        pytest.skip(f"{backend} not installed (scripts/ci-deps.sh installs it)")
    db = topology["db"]
    run = uuid.uuid4().hex[:8]

    # Before: the direct path works and is not metered.
    assert redirect("status", backend, check=False).returncode == 3
    before = f"before-{backend}-{run}"
    assert client(CLIENT_NS, before) == {"status": 200, "done": True}

    added = redirect("add", backend)
    assert f"via {backend}" in added.stdout
    status = redirect("status", backend)
    assert str(PROXY_PORT) in status.stdout and str(PROXY_UID) in status.stdout
    try:
        served = sim_total()
        remote, local = f"remote-{backend}-{run}", f"local-{backend}-{run}"
        assert client(CLIENT_NS, remote) == {"status": 200, "done": True}
        assert client(SERVER_NS, local) == {"status": 200, "done": True}
        for account in (remote, local):
            rows = rows_for(db, account, wait=10)
            assert len(rows) == 1, (rows, topology["proxy"].output()[-3000:])
            row = rows[0]
            assert row["node"] == f"{SERVER_IP}:{SERVER_PORT}"  # the original destination
            assert row["status"] == 200 and row["outcome"] == "completed"
            assert row["usage_source"] == "reported"
            assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        assert sim_total() == served + 2  # each request reached the server exactly once
    finally:
        redirect("remove", backend)

    assert redirect("status", backend, check=False).returncode == 3
    after = f"after-{backend}-{run}"
    served = sim_total()
    assert client(CLIENT_NS, after) == {"status": 200, "done": True}
    assert sim_total() == served + 1  # the request reached the server directly
    assert rows_for(db, after, wait=1.5) == []
    assert rows_for(db, before, wait=0) == []
    # The rule is gone from the ruleset, not just disabled.
    if backend == "nft":
        assert "spendtap" not in in_ns(SERVER_NS, "nft", "list", "ruleset").stdout
    else:
        assert "SPENDTAP" not in in_ns(SERVER_NS, "iptables", "-t", "nat", "-S").stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["add", "--proxy-port", "8080"], 1, "--port must be a TCP port"),
        (["add", "--port", "8000", "--proxy-port", "0"], 1, "--proxy-port must be a TCP port"),
        (["add", "--port", "8000", "--proxy-port", "8000", "--proxy-user", "65534"], 1,
         "must differ"),
        (["add", "--port", "8000", "--proxy-port", "8080", "--proxy-user", "0"], 1,
         "must not be root"),
        (["add", "--port", "8000", "--proxy-port", "8080", "--proxy-user", "no-such-user-x"], 1,
         "no such user"),
        (["add", "--port", "8000", "--bogus"], 2, "unknown argument"),
        (["frobnicate"], 2, "redirect.sh add"),
        (["status", "--backend", "pf"], 1, "--backend must be auto, nft or iptables"),
    ],
)  # fmt: skip
def test_redirect_script_refuses_bad_arguments(args, code, message):
    """Bad arguments fail before any rule is touched, with a clear message and exit status."""
    if not (shutil.which("nft", path=PATH) or shutil.which("iptables", path=PATH)):
        pytest.skip("neither nft nor iptables installed (scripts/ci-deps.sh installs them)")
    proc = sh(str(REDIRECT), *args, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert message in proc.stderr
