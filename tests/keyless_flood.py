"""Keyless WebSocket clients that reopen as soon as they are refused or closed
(the lock-out of issue 14 item 1), run in threads against a daemon process."""

from __future__ import annotations

import threading
import time
from types import TracebackType

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

#: Seconds the flood may take to fill the keyless budget, and to stop.
WAIT = 15.0


class KeylessFlood:
    """`clients` threads, each holding a keyless connection for as long as the
    daemon keeps it (until 4401, no AUTH in time) and reopening at once; with
    the budget full, each is refused (503) and tries again at once."""

    def __init__(self, ws_url: str, clients: int = 20):
        self._url = ws_url
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(clients)]
        self._lock = threading.Lock()
        self.refusals = 0

    def __enter__(self) -> KeylessFlood:
        for thread in self._threads:
            thread.start()
        deadline = time.monotonic() + WAIT
        while self.refusals < len(self._threads) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.refusals < len(self._threads):
            self.__exit__(None, None, None)
            raise AssertionError(f"the flood never filled the keyless budget "
                                 f"({self.refusals} refusals)")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self._url, proxy=None, open_timeout=WAIT, close_timeout=1,
                             ping_interval=None) as client:
                    while not self._stop.is_set():
                        try:
                            client.recv(timeout=0.2)
                        except TimeoutError:
                            continue
            except InvalidStatus:
                with self._lock:
                    self.refusals += 1
            except (ConnectionClosed, OSError):
                pass
