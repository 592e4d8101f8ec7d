"""The application interface: what a protocol written for mpd looks like, in the shape of
asyncio's Protocol/Transport and Twisted's Protocol/Factory.

- An **Application** names its parts: a factory of protocol objects, one per connection;
  optionally a factory of groups, one per key in the worker that owns the key; the
  version of the state its objects export.
- A **Protocol** object per connection gets connection_made(transport), then
  data_received(data) with every byte as it arrives, eof_received() and, exactly once,
  connection_lost(reason). It calls `self.transport.join(key)` to meet the other
  connections of that key: when another worker owns the key, the connection moves there
  (its fd, the bytes it has not consumed, and what export_state() returns). On the owner
  a fresh protocol object takes its place: mpd sets its `transport` and calls
  state_restored(state) instead of connection_made(), before any data_received(). The
  protocol never sees the move otherwise.
- A **Group** per key, in the worker that owns the key, made by the application's group
  factory: member_joined(transport) and member_left(transport, reason), `members`,
  broadcast(data, exclude=None) (a local loop: the members are in this process),
  call_later(), and whatever state the application keeps on it. A group lives while it
  has members. When its key changes owner (a scale, an upgrade, `mpdctl move`), the group
  and its members move together: export_state() on the old owner, state_restored() on the
  new one, with every member's unread bytes and pending output; nothing is lost,
  repeated or reordered.
- The **transport** is mpd's: write(), writelines(), close(), abort(), pause_reading(),
  resume_reading(), get_extra_info("peername") (the real client behind a PROXY header),
  join(key), `key`, `group`, call_later(). See Transport below.

Every callback runs inside a boundary: an exception in a protocol's callback ends that
connection (connection_lost("error")), one in a group's hook or timer ends that group
(its members are closed, each with connection_lost("group_error")), and never the worker.

State (export_state's return value) is plain data: None, bool, int, float, str, bytes,
and lists, tuples, dicts and sets of them (apps/state.py). Its size is bounded
(workers.max_group_state); an application declares the version it writes and the
versions it reads, and an upgrade whose new code cannot read the running version is
refused before anything moves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Union
from typing import Protocol as Interface

from mpd.wire.routing import Key

# Why a connection was lost (connection_lost's argument).
EOF = "eof"  # the client closed, and whatever was due to it was written
RESET = "reset"  # the connection failed (ECONNRESET, EPIPE, ...)
IDLE = "idle"  # workers.idle_timeout or first_frame_timeout
OVERFLOW = "overflow"  # more than workers.max_output_buffer waited for it: cut with a reset
PROTOCOL_ERROR = "protocol_error"  # the protocol raised ProtocolError
ERROR = "error"  # the protocol raised anything else (a bug): logged with its traceback
GROUP_ERROR = "group_error"  # its group's hook or timer raised: the group ended
CLOSED = "closed"  # the application closed it (transport.close() or abort())
STOP = "stop"  # mpd stops (a graceful stop closes each connection at a frame boundary)


class ProtocolError(Exception):
    """The client broke the protocol: raised in data_received(), it closes that client
    (client.protocol_error, counted) and nothing else."""


class StatelessFrame(NamedTuple):
    """An application's offer to the worker loop, for its commonest case (ping's). A read
    that is exactly one frame, ending with the byte `end` (its only such byte), not
    starting with `keyed`, from a connection with nothing pending, gets `reply` without a
    call into the protocol. The protocol must answer such a frame the same way, and keep
    its `pending` attribute true while it holds part of a frame. `max_frame` must be at
    least the loop's read size, so that one read cannot break the frame bound.

    With `key_size`, a `keyed` frame is `keyed` + key_size bytes of a little-endian
    signed int, and a read of a connection with no protocol object yet that starts with
    one joins that key without a call into the protocol (the protocol must join it the
    same way); its object is made when a frame that is not stateless comes."""
    end: int
    keyed: int  # a frame that starts with this byte is not stateless (-1: none does)
    reply: bytes
    max_frame: int
    key_size: int = 0  # 0: the protocol reads keyed frames itself


class Timer:
    """What call_later() returns: cancel() it to call nothing."""
    __slots__ = ("when", "callback", "args", "owner", "cancelled")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...],
                 owner: Any):
        self.when, self.callback, self.args, self.owner = when, callback, args, owner
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: Timer) -> bool:
        return self.when < other.when


class Transport(Interface):
    """What a protocol object may do with its connection (mpd's worker implements it)."""

    @property
    def key(self) -> Key | None: ...  # the key it joined (str keys are kept as UTF-8 bytes)

    @property
    def group(self) -> Group | None: ...  # its group, once it joined in a grouped app

    def write(self, data: bytes) -> None: ...  # queued; sent at the end of the loop's turn

    def writelines(self, chunks: list[bytes]) -> None: ...

    def close(self) -> None: ...  # once what is queued is written

    def abort(self) -> None: ...  # now, with a reset; what is queued is dropped

    def is_closing(self) -> bool: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

    def get_protocol(self) -> Protocol: ...

    def join(self, key: bytes | str | int, rest: bytes = b"") -> None:
        """Meet the connections of `key` (see the module's note). Call it from
        data_received() at a frame boundary, giving the bytes of this read that follow
        the frame that joined as `rest`, and return without consuming more: they are fed
        to data_received() after the join, here or on the key's owner. In an application
        with groups a connection joins once; without groups a key only routes, and
        joining another routes the connection again."""

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer: ...

    def count_requests(self, frames: int = 1) -> None:
        """Add to mpd's count of requests (mpd_requests_total, `mpdctl status`): the
        frames the application took as requests (a ping, a line)."""


class Protocol:
    """Base class of protocol objects (optional: any object with these methods does)."""
    transport: Any = None
    # Only for an application with a stateless offer: true while part of a frame waits.
    pending = False

    def connection_made(self, transport: Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool | None:
        """The client half-closed. True keeps the connection (to write more); otherwise
        it is closed once what is due to it is written."""
        return None

    def connection_lost(self, reason: str) -> None:
        pass

    def export_state(self) -> Any:
        """What the object on the key's owner needs to go on (plain data; see above)."""
        return None

    def state_restored(self, state: Any) -> None:
        pass


class Group:
    """Base class of groups: mpd keeps `key` and the members; subclasses keep their
    state and override the hooks. mpd sets the internals up after the group factory
    returns, so a subclass's __init__ need not call this one's."""
    key: Key
    _members: list[Any]
    _snapshot: tuple[Any, ...] | None
    _host: Any  # the worker's group table (worker/groups.py)
    _writers: dict[Any, Any] | None  # member -> its queue's append (list.append)
    _dirty: bool  # a broadcast queued output since the end of the last turn
    _gseq: int  # the newest ADOPT the group took (worker/groups.py)
    _failed: bool  # a hook raised: the group is ending

    @property
    def members(self) -> tuple[Any, ...]:
        """The members now (a snapshot: closing one while iterating is safe)."""
        if self._snapshot is None:
            self._snapshot = tuple(self._members)
        return self._snapshot

    def broadcast(self, data: bytes, exclude: Any = None) -> None:
        """Write `data` to every member but `exclude`: one buffer, shared by all; each
        member's queue is sent at the end of the loop's turn, in one system call."""
        if type(data) is not bytes:
            data = bytes(data)
        if not data:
            return
        # The floor's loop: a reference appended to each member's queue, and the group,
        # not each member, marked for the end of the turn (which counts the bytes).
        writers = self._writers
        if writers is None:
            writers = self._host.writers(self)
        for append in writers.values():
            append(data)
        if exclude in writers:
            exclude.outq.pop()  # its own copy, appended last
        if not self._dirty:
            self._host.queued(self)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        """Call callback(*args) in `delay` seconds, unless cancelled or the group ends or
        moves first (state_restored() on the new owner sets its timers again)."""
        return self._host.call_later(self, delay, callback, args)

    def member_joined(self, transport: Transport) -> None:
        pass

    def member_left(self, transport: Transport, reason: str) -> None:
        pass

    def export_state(self) -> Any:
        return None

    def state_restored(self, state: Any) -> None:
        pass


@dataclass(frozen=True)
class Application:
    """What `server.protocol` loads (apps/loader.py): `protocol()` makes the object for a
    new connection, `group(key)` the group of a key (None: the application has no groups,
    and a key only routes its connection, as ping's does). `state_version` is what
    export_state() writes; `reads_state` the versions state_restored() can read.
    `refusal` is sent to a client no worker can take, before it is closed."""
    name: str
    protocol: Callable[[], Any]
    group: Callable[[Key], Group] | None = None
    state_version: int = 1
    reads_state: tuple[int, ...] = (1,)
    refusal: bytes = b""
    stateless: StatelessFrame | None = None


AnyKey = Union[bytes, str, int]
