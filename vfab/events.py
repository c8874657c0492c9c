"""An in-process publish/subscribe bus for what the daemon has to tell.

Producers (the queue, the device, the system monitor) publish messages shaped
as the WebSocket contract's output messages; consumers (WebSocket clients,
hooks, metrics) subscribe. Messages are plain dicts with a lowercase `type`.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.logger import Logger

CHANNELS = ("system", "jobs", "device")

Message = dict[str, Any]
Subscriber = Callable[[str, Message], None]

_log = Logger()


class EventBus:
    """Delivers each published message to every subscriber, in order."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber(channel, message)` for every message; returns an unsubscribe."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, channel: str, message: Message) -> None:
        """Hand `message` to every subscriber; one failing subscriber does not stop the rest."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        for subscriber in list(self._subscribers):
            try:
                subscriber(channel, message)
            except Exception:
                _log.failure("subscriber {subscriber!r} failed on {type}",
                             subscriber=subscriber, type=message.get("type"))
