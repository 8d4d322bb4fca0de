"""Let the ``error`` hook answer a failed upstream instead of mitmproxy's HTML 502 page.

mitmproxy (12.x) answers a request whose upstream failed before the response
head (connection refused, TLS failure, reset, timeout) with its own
``text/html`` page that names the upstream's address, whatever an addon does in
the ``error`` hook. ``install`` wraps ``HttpStream.handle_protocol_error`` so
that when the ``error`` hook sets ``flow.response`` for such a flow, that
response is sent instead (the same change as mitmproxy pull request #7999).
Everything else keeps mitmproxy's own path, step for step.

If mitmproxy's internals are not what this expects, ``install`` changes nothing
and returns False: clients then get mitmproxy's page, and the hook layer logs it.
"""

from __future__ import annotations

import time

__all__ = ["install"]

_MARK = "_spendtap_error_answer"


def install() -> bool:
    try:
        from mitmproxy import flow as mflow
        from mitmproxy.proxy.layers.http import (
            DropStream,
            HttpErrorHook,
            HttpStream,
            ResponseProtocolError,
            SendHttp,
        )
    except ImportError:
        return False
    original = HttpStream.handle_protocol_error
    if getattr(original, _MARK, False):
        return True
    needed = ("check_killed", "send_response", "state_done", "state_errored")
    if not all(hasattr(HttpStream, name) for name in needed):
        return False

    def handle_protocol_error(self, event):
        if not (
            isinstance(event, ResponseProtocolError)
            and self.flow.response is None
            and self.client_state == self.state_done
            and self.server_state not in (self.state_done, self.state_errored)
        ):
            yield from original(self, event)
            return
        # mitmproxy's own steps for this case, with one difference: a response the
        # error hook sets is sent to the client instead of the error page.
        self.flow.error = mflow.Error(event.message)
        yield HttpErrorHook(self.flow)
        if (yield from self.check_killed(False)):
            return
        if self.flow.response is not None:
            now = time.time()
            self.flow.response.timestamp_start = self.flow.response.timestamp_start or now
            yield from self.send_response()
            return
        yield SendHttp(event, self.context.client)
        self.server_state = self.state_errored
        self.flow.live = False
        yield DropStream(self.stream_id)

    setattr(handle_protocol_error, _MARK, True)
    HttpStream.handle_protocol_error = handle_protocol_error
    return True
