"""Each mitmproxy hook goes only to the addons that have it (``spendtap.proxy.dispatch``).

Under ``mitmdump -s`` the running master's manager becomes a ``HookCache``: every addon
mitmdump loaded (its own, spendtap's, another script's) still gets every hook it has, in
chain order, and a chain changed by any means is listed again.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from mitmproxy import addonmanager, exceptions, hooks
from mitmproxy.test import taddons

from spendtap.proxy.dispatch import HookCache, cache_hooks, uncache_hooks
from tests.helpers import principal


class Recorder:
    def __init__(self, name: str, seen: list[str]):
        self.name = name
        self.seen = seen

    def running(self):
        self.seen.append(self.name)


class Halting:
    def running(self):
        raise exceptions.AddonHalt()


class Parent:
    """An addon with children it changes from its ``configure``, as mitmproxy's script
    loader does when the scripts are re-ordered."""

    def __init__(self, *children):
        self.addons = list(children)
        self.next: list | None = None

    def configure(self, updated):
        if self.next is not None:
            self.addons, self.next = self.next, None


def _run(coro_fn):
    async def go():
        with taddons.context() as tctx:
            await coro_fn(tctx)

    asyncio.run(go())


def test_a_running_manager_becomes_a_cache_once_and_keeps_its_addons():
    async def check(tctx):
        manager = tctx.master.addons
        seen: list[str] = []
        a, b = Recorder("a", seen), Recorder("b", seen)
        manager.add(a, b)
        chain = list(manager.chain)
        assert cache_hooks(manager) is True
        assert isinstance(manager, HookCache) and manager.chain == chain
        assert manager.get("a") is a  # the look-up by name is the manager's own
        assert cache_hooks(manager) is False  # already one
        await manager.trigger_event(hooks.RunningHook())
        assert seen == ["a", "b"]

    _run(check)


def test_a_cache_gives_back_mitmproxys_own_dispatch():
    async def check(tctx):
        manager = tctx.master.addons
        seen: list[str] = []
        manager.add(Recorder("a", seen))
        assert uncache_hooks(manager) is False  # not a cache
        cache_hooks(manager)
        assert uncache_hooks(manager) is True
        assert type(manager) is addonmanager.AddonManager
        await manager.trigger_event(hooks.RunningHook())
        assert seen == ["a"]

    _run(check)


def test_a_manager_of_another_class_is_left_alone():
    class Custom(addonmanager.AddonManager):
        pass

    async def check(tctx):
        manager = Custom(tctx.master)
        assert cache_hooks(manager) is False
        assert type(manager) is Custom

    _run(check)


def test_an_addons_error_is_logged_the_others_run_and_a_halt_stops_the_rest(caplog):
    async def check(tctx):
        manager = tctx.master.addons
        seen: list[str] = []

        class Broken:
            def running(self):
                seen.append("broken")
                raise RuntimeError("an addon's bug")

        manager.add(Recorder("a", seen), Broken(), Recorder("b", seen))
        cache_hooks(manager)
        await manager.trigger_event(hooks.RunningHook())
        assert seen == ["a", "broken", "b"]
        assert "an addon's bug" in caplog.text
        seen.clear()
        manager.add(Halting(), Recorder("after the halt", seen))
        await manager.trigger_event(hooks.RunningHook())
        assert seen == ["a", "broken", "b"]

    _run(check)


def test_children_changed_by_a_configure_are_listed_again():
    async def check(tctx):
        manager = tctx.master.addons
        seen: list[str] = []
        first, second = Recorder("first", seen), Recorder("second", seen)
        parent = Parent(first, second)
        manager.add(parent)
        cache_hooks(manager)
        await manager.trigger_event(hooks.RunningHook())
        parent.next = [second]  # the next configure drops the first child
        manager.trigger(hooks.ConfigureHook(set()))
        await manager.trigger_event(hooks.RunningHook())
        assert seen == ["first", "second", "second"]

    _run(check)


def test_a_chain_changed_behind_the_managers_back_is_listed_again():
    async def check(tctx):
        manager = tctx.master.addons
        seen: list[str] = []
        first = Recorder("a", seen)
        manager.add(first)
        cache_hooks(manager)
        await manager.trigger_event(hooks.RunningHook())
        manager.chain.append(Recorder("appended", seen))  # not through add()
        await manager.trigger_event(hooks.RunningHook())
        manager.remove(first)
        await manager.trigger_event(hooks.RunningHook())
        assert seen == ["a", "a", "appended", "appended"]

    _run(check)


EXTRA_SCRIPT = """
from mitmproxy import ctx


class Extra:
    def __init__(self):
        self.requests = 0

    def request(self, flow):
        self.requests += 1

    def responseheaders(self, flow):
        flow.response.headers["x-extra-requests"] = str(self.requests)
        flow.response.headers["x-dispatch"] = type(ctx.master.addons).__name__


addons = [Extra()]
"""


@pytest.mark.e2e
@pytest.mark.parametrize("cached", [True, False])
def test_another_scripts_hooks_still_run_beside_spendtaps(start_sidecar, sim, tmp_path, cached):
    extra = tmp_path / "extra.py"
    extra.write_text(EXTRA_SCRIPT)
    sets = [] if cached else ["spendtap_cache_hooks=false"]
    proxy = start_sidecar(sim.url, *sets, scripts=[extra])
    body = {"model": "sim-chat", "messages": [{"role": "user", "content": "hi"}]}
    accounts = []
    for n in range(1, 4):
        account, headers = principal()
        accounts.append(account)
        resp = httpx.post(
            proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
        )
        assert resp.status_code == 200
        assert resp.headers["x-extra-requests"] == str(n)
        assert resp.headers["x-dispatch"] == ("HookCache" if cached else "AddonManager")
    for account in accounts:
        assert proxy.row_for(account)["outcome"] == "completed"
