"""An in-process publish/subscribe bus for what the daemon has to tell.

Producers (the queue, the device, the system monitor) publish messages shaped
as the WebSocket contract's output messages; consumers (WebSocket clients,
hooks, metrics) subscribe. Messages are plain dicts with a lowercase `type`.

On a farm, what another host published arrives here too (`remote=True`): only
the subscribers that show the farm (WebSocket clients, the queue's wake-ups)
ask for those; hooks, metrics and the relay to the other hosts see this
host's own events alone.
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
        #: The subscribers that also take other hosts' messages.
        self._farm: set[Subscriber] = set()

    def subscribe(self, subscriber: Subscriber, *, remote: bool = False) -> Callable[[], None]:
        """Call `subscriber(channel, message)` for every message of this host (and, with
        `remote`, of the farm's other hosts); returns an unsubscribe."""
        self._subscribers.append(subscriber)
        if remote:
            self._farm.add(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)
            self._farm.discard(subscriber)

        return unsubscribe

    def publish(self, channel: str, message: Message, *, remote: bool = False) -> None:
        """Hand `message` to every subscriber (`remote`: another host's message, to the
        subscribers that asked for those); one failing subscriber does not stop the rest."""
        if channel not in CHANNELS:
            raise ValueError(f"unknown channel {channel!r}")
        for subscriber in list(self._subscribers):
            if remote and subscriber not in self._farm:
                continue
            try:
                subscriber(channel, message)
            except Exception:
                _log.failure("subscriber {subscriber!r} failed on {type}",
                             subscriber=subscriber, type=message.get("type"))
