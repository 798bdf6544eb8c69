"""Task events sent back to containerd: ttrpc `Events.Forward` to the address in $TTRPC_ADDRESS.

containerd 1.6 gives every shim the address of its ttrpc events service; an event is an Envelope
(timestamp, namespace, topic, typeurl Any). Publishing never blocks a Task RPC: events go into a
queue and one sender forwards them in order, reconnecting and retrying each a few times (containerd's
own shims do the same, five tries), so an exit event is never overtaken by a later one.

Events differ in who can cause them. TaskOOM comes from the guest (the agent's GetOOMEvent), and the
guest is untrusted: it may send them as fast as it likes. So guest-caused events are rate-limited per
container (one per OOM_INTERVAL: containerd only needs one to mark a container OOM-killed) and at most
MAX_GUEST_QUEUED of them wait in the queue; past that they are dropped. Every other event follows an
action of the host (a create, a start, a process the host waited for): their number is bounded by
those actions, and they are never dropped for lack of room, so a guest flood cannot cost a TaskExit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from pykata.protocols import EVENTS_SERVICE, events_pb2, ttrpc_events_pb2, typeurl
from pykata.ttrpc import Client, RpcError, connect_unix

log = logging.getLogger("pykata.shim.events")

# Guest-caused events (TaskOOM) waiting to be sent, at most.
MAX_GUEST_QUEUED = 64
# Seconds between two guest-caused events of one container.
OOM_INTERVAL = 1.0
GUEST_CAUSED: frozenset[type[Message]] = frozenset({events_pb2.TaskOOM})
MAX_TRIES = 5
FORWARD_TIMEOUT = 5.0

TOPICS: dict[type[Message], str] = {
    events_pb2.TaskCreate: "/tasks/create",
    events_pb2.TaskStart: "/tasks/start",
    events_pb2.TaskExit: "/tasks/exit",
    events_pb2.TaskDelete: "/tasks/delete",
    events_pb2.TaskExecAdded: "/tasks/exec-added",
    events_pb2.TaskExecStarted: "/tasks/exec-started",
    events_pb2.TaskPaused: "/tasks/paused",
    events_pb2.TaskResumed: "/tasks/resumed",
    events_pb2.TaskOOM: "/tasks/oom",
    events_pb2.TaskCheckpointed: "/tasks/checkpointed",
}


def topic_of(event: Message) -> str:
    """containerd's topic for a task event ("/tasks/exit"). Raises KeyError for other messages."""
    return TOPICS[type(event)]


def envelope(namespace: str, event: Message, at: Timestamp | None = None) -> ttrpc_events_pb2.Envelope:
    """The Envelope containerd's Events.Forward takes for `event`."""
    if at is None:
        at = Timestamp()
        at.GetCurrentTime()
    return ttrpc_events_pb2.Envelope(timestamp=at, namespace=namespace, topic=topic_of(event),
                                     event=typeurl.pack(event))


@dataclass
class _Item:
    envelope: ttrpc_events_pb2.Envelope
    guest_caused: bool = False
    tries: int = 0


class EventPublisher:
    """Forwards task events to containerd in the order they were published.

    `publish()` only queues (see the module docstring for what may be dropped). `close()` gives the
    queue a bounded time to drain, then drops the rest. With no address (the shim run by hand),
    events are logged and dropped.
    """

    def __init__(self, address: str | None, namespace: str, *, retry_delay: float = 1.0,
                 oom_interval: float = OOM_INTERVAL) -> None:
        self.address = address
        self.namespace = namespace
        self.retry_delay = retry_delay
        self.oom_interval = oom_interval
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._guest_queued = 0
        self._last_guest_event: dict[tuple[str, str], float] = {}
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None
        self.sent = 0  # events forwarded (a count: a list of them grew for the shim's whole life)
        self.dropped = 0
        self.dropped_guest_events = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="event-publisher")

    def publish(self, event: Message) -> None:
        """Queue `event` for containerd; never blocks. A guest-caused event (TaskOOM) over its rate
        or past MAX_GUEST_QUEUED is dropped (counted in `dropped`); any other event is always queued."""
        guest_caused = type(event) in GUEST_CAUSED
        if guest_caused and not self._admit_guest_event(event):
            self.dropped += 1
            return
        env = envelope(self.namespace, event)
        log.debug("event %s %s", env.topic, _describe(event))
        if guest_caused:
            self._guest_queued += 1
        self._queue.put_nowait(_Item(env, guest_caused))

    def _admit_guest_event(self, event: Message) -> bool:
        if self._guest_queued >= MAX_GUEST_QUEUED:
            if self.dropped_guest_events % 1000 == 0:
                log.warning("events: too many guest-caused events queued; dropping %s", topic_of(event))
            self.dropped_guest_events += 1
            return False
        key = (topic_of(event), str(getattr(event, "container_id", "")))
        now = asyncio.get_running_loop().time()
        if len(self._last_guest_event) >= 1024:  # forget the containers that are quiet anyway
            self._last_guest_event = {k: t for k, t in self._last_guest_event.items() if now - t < self.oom_interval}
        last = self._last_guest_event.get(key)
        if last is not None and now - last < self.oom_interval:
            self.dropped_guest_events += 1
            return False
        self._last_guest_event[key] = now
        return True

    async def close(self, timeout: float = 3.0) -> None:
        """Send what is queued (for at most `timeout` seconds), then stop. Idempotent."""
        if self._task is not None and not self._task.done():
            self._queue.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                log.warning("events: %d not sent to containerd before exit", self._queue.qsize())
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _run(self) -> None:
        while (item := await self._queue.get()) is not None:
            if item.guest_caused:
                self._guest_queued -= 1
            while True:
                try:
                    await self._forward(item.envelope)
                    self.sent += 1
                    break
                except (RpcError, OSError, TimeoutError) as e:
                    item.tries += 1
                    if self._client is not None:
                        await self._client.close()
                        self._client = None
                    if item.tries >= MAX_TRIES:
                        self.dropped += 1
                        log.error("events: dropping %s after %d tries: %s", item.envelope.topic, item.tries, e)
                        break
                    log.warning("events: forwarding %s failed (%s); retrying", item.envelope.topic, e)
                    await asyncio.sleep(self.retry_delay * item.tries)

    async def _forward(self, env: ttrpc_events_pb2.Envelope) -> None:
        if not self.address:
            return
        if self._client is None or self._client.closed:
            self._client = await connect_unix(self.address.removeprefix("unix://"), timeout=FORWARD_TIMEOUT)
        await self._client.call(EVENTS_SERVICE, "Forward", ttrpc_events_pb2.ForwardRequest(envelope=env),
                                timeout=FORWARD_TIMEOUT)


def _describe(event: Message) -> str:
    fields = ("container_id", "id", "exec_id", "pid", "exit_status")
    return " ".join(f"{f}={getattr(event, f)}" for f in fields if f in event.DESCRIPTOR.fields_by_name)
