"""`keys add` without --generate: what the README says is what it does.

A new user ran the README's "generates a key" line in a script (no terminal,
nothing on stdin) and got an error. Now the README and --help show
``--generate`` for a new key, and these tests hold the three cases with real
processes: a pipe, an empty non-terminal stdin, and a real pseudo-terminal.
"""

from __future__ import annotations

import os
import re
import subprocess

from spendtap.store.keys import Keys
from tests.helpers import SPENDTAP_MODULE
from tests.proc import REPO


def _add(db, *extra, **kw):
    return subprocess.run(
        [*SPENDTAP_MODULE, "keys", "add", "--account", "a", "--key-id", "k", "--db", str(db),
         *extra],
        capture_output=True, text=True, timeout=60, **kw,
    )  # fmt: skip


def test_no_terminal_and_nothing_on_stdin_is_one_line(tmp_path):
    """stdin is /dev/null, no --generate: one Error line naming both ways, no key, exit 1."""
    db = tmp_path / "ledger.db"
    out = _add(db, stdin=subprocess.DEVNULL)
    assert out.returncode == 1
    assert out.stderr == (
        "Error: no secret on stdin and it is not a terminal: pipe the secret in, "
        "or pass --generate to make a new one\n"
    )
    assert out.stdout == ""


def test_generate_without_terminal(tmp_path):
    """--generate in a script: the secret on stdout once, and it resolves to the key."""
    db = tmp_path / "ledger.db"
    out = _add(db, "--generate", stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    with Keys(db) as keys:
        assert keys.resolve(secret) == ("a", "k")


def test_piped_secret(tmp_path):
    """A piped secret is registered as it is."""
    db = tmp_path / "ledger.db"
    secret = "sk-" + "p" * 40
    out = _add(db, input=secret + "\n")
    assert out.returncode == 0, out.stderr
    with Keys(db) as keys:
        assert keys.resolve(secret) == ("a", "k")


def test_terminal_generates(tmp_path):
    """At a real terminal (a pty on stdin), no flag: a new key is generated and printed."""
    db = tmp_path / "ledger.db"
    leader, follower = os.openpty()
    try:
        out = _add(db, stdin=follower)
    finally:
        os.close(follower)
        os.close(leader)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    with Keys(db) as keys:
        assert keys.resolve(secret) == ("a", "k")


def test_readme_and_help_show_generate_for_a_new_key():
    """Every documented `keys add` that makes a new key passes --generate; one that does
    not pass it pipes a secret in."""
    readme = (REPO / "README.md").read_text()
    out = subprocess.run(
        [*SPENDTAP_MODULE, "keys", "add", "--help"], capture_output=True, text=True
    )
    group = subprocess.run([*SPENDTAP_MODULE, "keys", "--help"], capture_output=True, text=True)
    lines = [
        line
        for text in (readme, out.stdout, group.stdout)
        for line in text.splitlines()
        if re.search(r"spendtap keys add --", line)
    ]
    assert len(lines) >= 4
    for line in lines:
        assert "--generate" in line or "|" in line.split("spendtap keys add")[0], line
