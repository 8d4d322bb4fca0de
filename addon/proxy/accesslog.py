"""Optional JSONL access log: one line per finished request, written off the event loop.

Lines carry the ledger row's figures only: never a body, a header or a secret.
A new log file is created readable by its owner only.
Writes go through a ``QueueHandler`` so the hook that logs never waits on disk.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue

from spendtap.store.ledger import create_private


class AccessLog:
    def __init__(self, path: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        create_private(path)  # who spent what: the owner's to read
        handler = logging.FileHandler(path, encoding="utf-8", delay=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._handler = handler
        self._logger = logging.Logger(f"spendtap.access.{id(self)}")
        self._logger.propagate = False
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._listener.start()

    def write(self, row: dict) -> None:
        self._logger.info(json.dumps(row, separators=(",", ":"), default=str))

    def close(self) -> None:
        self._listener.stop()
        self._handler.close()
