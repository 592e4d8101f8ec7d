"""Every message between a master and its workers, defined once: its kind, its fields
(a class per kind) and its bytes. A message is one datagram of a SEQPACKET channel
(channel.py), so fds travel with the message that names them:

    header  <BBH  version, kind, length of the meta
    meta    the fields: JSON, except for the messages that travel per client or per
            chunk of a group's move (HANDOFF, ADOPT, MOVE_CHUNK), which have a fixed
            binary layout
    rest    bytes the message carries: a client's unread bytes, a chunk of a move

Version 3 is this code's. A master that upgraded in place from the release before
adopts workers that speak version 2 until its roll replaces them; legacy.py speaks that
to them. A handler that takes an fd of a message removes it from `fds`; the channel's
reader closes what is left."""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from mpd.wire.peer import NO_PEER, PEER, Address, pack_peer, unpack_peer
from mpd.wire.routing import Key

VERSION = 3
HEADER = struct.Struct("<BBH")


class Kind(enum.IntEnum):
    # worker -> master
    HELLO = 1
    STATS = 2
    HANDOFF = 3
    GROUP_ENDED = 4
    MOVED = 5
    MOVE_FAILED = 6
    MOVE_CHUNK = 7  # worker -> master -> worker: the master relays it
    GROUP_INFO = 8
    # master -> worker
    ROUTES = 10
    ADOPT = 11
    CONFIG = 12
    RETIRE = 13
    STOP = 14
    MOVE_OUT = 15
    MOVE_DONE = 16
    MOVE_ABORT = 17
    REOPEN_LOGS = 18
    GROUP_QUERY = 19


class Message:
    """A decoded message; `fds` are those that came with it (see the module's note)."""
    kind: ClassVar[Kind]
    fds: list[int]

    def encode(self, version: int = VERSION) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, data: bytes, meta_end: int, version: int) -> Message:
        raise NotImplementedError


# --- keys in JSON: {"int": 5} or {"hex": "..."} ---------------------------------------------

def key_to_json(key: Key | None) -> Any:
    if key is None:
        return None
    return {"int": key} if isinstance(key, int) else {"hex": key.hex()}


def key_from_json(value: Any) -> Key | None:
    """Raises ValueError on anything key_to_json() cannot have made."""
    if value is None:
        return None
    if isinstance(value, dict) and type(value.get("int")) is int:
        return value["int"]
    if isinstance(value, dict) and isinstance(value.get("hex"), str):
        return bytes.fromhex(value["hex"])
    raise ValueError(f"not a key: {value!r}")


# --- messages with JSON fields ----------------------------------------------------------------

def json_meta(data: bytes, meta_end: int) -> dict[str, Any]:
    """A message's meta as a JSON object; ValueError saying what is wrong with it."""
    try:
        meta = json.loads(data[HEADER.size:meta_end])
    except ValueError as e:
        raise ValueError(f"bad JSON meta: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError("meta is not a JSON object")
    return meta


class JsonMessage(Message):
    """A dataclass whose fields are its JSON meta. Types are checked on decode: a field
    whose default is an int must be an int, and so on."""

    def encode(self, version: int = VERSION) -> bytes:
        body = json.dumps(self.fields(), separators=(",", ":")).encode()
        return HEADER.pack(version, self.kind, len(body)) + body

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]

    @classmethod
    def decode(cls, data: bytes, meta_end: int, version: int) -> Message:
        return cls.from_fields(json_meta(data, meta_end))

    @classmethod
    def from_fields(cls, meta: dict[str, Any]) -> Message:
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            if f.name not in meta:
                continue  # a field an older peer does not send: its default
            value = meta[f.name]
            check = CHECKS.get(str(f.type))
            if check is not None and not check(value):
                raise ValueError(f"{cls.kind.name}.{f.name}: expected {f.type}, got {value!r}")
            values[f.name] = value
        message = cls(**values)
        message.fds = []
        return message


CHECKS = {
    "int": lambda v: type(v) is int,
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "int | None": lambda v: v is None or type(v) is int,
    "list[int]": lambda v: isinstance(v, list) and all(type(x) is int for x in v),
    "dict[str, Any]": lambda v: isinstance(v, dict),
    "Any": lambda v: True,
}


@dataclass
class Hello(JsonMessage):
    """The worker's loop serves (its signal handlers in place, its fds counted)."""
    kind: ClassVar[Kind] = Kind.HELLO
    slot: int | None = None
    pid: int = 0
    version: str = ""
    state_version: int = 0  # what the application's export_state() writes


@dataclass
class Stats(JsonMessage):
    """The heartbeat, about once a second: the worker's counters (wire/counters.py) and
    gauges, its latency histogram and the number of the config it runs."""
    kind: ClassVar[Kind] = Kind.STATS
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class GroupEnded(JsonMessage):
    """The last member of a group that the master placed here (by ADOPT) left. `gseq`:
    the newest ADOPT the group took; the master forgets the placement only if it sent
    none since."""
    kind: ClassVar[Kind] = Kind.GROUP_ENDED
    key: Any = None
    gseq: int = 0


@dataclass
class Moved(JsonMessage):
    """The new owner restored the group of move `move`: it is served here from now. The
    transfer's members and bytes, and the pause its members saw (freeze to restore)."""
    kind: ClassVar[Kind] = Kind.MOVED
    move: int = 0
    members: int = 0
    size: int = 0
    pause_us: int = 0


@dataclass
class MoveFailed(JsonMessage):
    """Either end of move `move` could not go on: why."""
    kind: ClassVar[Kind] = Kind.MOVE_FAILED
    move: int = 0
    reason: str = ""


@dataclass
class GroupInfo(JsonMessage):
    """The answer to GROUP_QUERY `query`: the group of `key` here, if any."""
    kind: ClassVar[Kind] = Kind.GROUP_INFO
    query: int = 0
    key: Any = None
    members: int = -1  # -1: no group of that key here
    moving: bool = False


@dataclass
class Routes(JsonMessage):
    """The slots that own keys (routing.Routes), numbered by epoch."""
    kind: ClassVar[Kind] = Kind.ROUTES
    epoch: int = 0
    table: list[int] = field(default_factory=list)


@dataclass
class Config(JsonMessage):
    """The live settings of a reloaded config, and its number."""
    kind: ClassVar[Kind] = Kind.CONFIG
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Retire(Routes):
    """Stop accepting, hand every client that is in no group to its key's owner under
    these routes, wait for the master to move the groups away, then exit."""
    kind: ClassVar[Kind] = Kind.RETIRE


@dataclass
class Stop(JsonMessage):
    """Graceful stop: no new clients; each is closed at a frame boundary."""
    kind: ClassVar[Kind] = Kind.STOP


@dataclass
class MoveOut(JsonMessage):
    """Export the group of `key` and send it, in MOVE_CHUNKs, for slot `to_slot`."""
    kind: ClassVar[Kind] = Kind.MOVE_OUT
    move: int = 0
    key: Any = None
    to_slot: int = 0


@dataclass
class MoveDone(JsonMessage):
    """The group of move `move` is served by its new owner: drop your copies."""
    kind: ClassVar[Kind] = Kind.MOVE_DONE
    move: int = 0


@dataclass
class MoveAbort(JsonMessage):
    """Move `move` is off: the old owner serves the group on, the new one forgets it."""
    kind: ClassVar[Kind] = Kind.MOVE_ABORT
    move: int = 0


@dataclass
class GroupQuery(JsonMessage):
    """What is the group of `key` like here (mpdctl where)? The answer is GROUP_INFO."""
    kind: ClassVar[Kind] = Kind.GROUP_QUERY
    query: int = 0
    key: Any = None


@dataclass
class ReopenLogs(JsonMessage):
    """Reopen the log file (logrotate renamed it)."""
    kind: ClassVar[Kind] = Kind.REOPEN_LOGS


# --- a client on its way: HANDOFF (worker -> master) and ADOPT (master -> worker) ----------

# key type (0 none, 1 int, 2 bytes), the int key, the key's hash, from_slot (-1 none),
# from_pid, sent_ns, owner (-1 none), epoch, rank, flags, gseq, peer, key length, state
# length; then the key's bytes, the state's bytes, and the client's unread bytes.
CLIENT = struct.Struct(f"<BqQiiQiIHBI{PEER.size}sHI")
CLIENT_FRAME = struct.Struct(HEADER.format + CLIENT.format[1:])
LAST, PASSED_ON = 1, 2  # flags
CLIENT_KINDS = {Kind.HANDOFF.value: Kind.HANDOFF, Kind.ADOPT.value: Kind.ADOPT}


class Client(Message):
    """A client's connection on its way between workers, with everything that is not in
    its socket: its key, its unread bytes, its protocol object's state, who it really is.
    One layout, two kinds: HANDOFF (worker -> master) and ADOPT (master -> worker).

    HANDOFF: `owner` is the slot the sender found with routes of `epoch` (the master takes
    that answer when its routes are of the same epoch), None when the sender leaves it to
    the master (a group's key: the master knows where groups are). `passed_on`: a full
    worker gives back a client it was offered; `rank` is then its place in the key's
    ranking. ADOPT: `rank` is the adopter's place in the key's ranking (0: the owner),
    `last` says no serving slot comes after it (full, it refuses the client), `gseq`
    numbers the ADOPTs of a group's key (GroupEnded)."""
    __slots__ = ("kind", "key", "key_hash", "unread", "state", "peer", "sent_ns", "owner",
                 "epoch", "rank", "last", "passed_on", "gseq", "from_slot", "from_pid", "fds")

    def __init__(self, kind: Kind, key: Key | None, key_hash: int, unread: bytes = b"",
                 state: bytes = b"", peer: Address | None = None, sent_ns: int = 0,
                 owner: int | None = None, epoch: int = 0, rank: int = 0, last: bool = False,
                 passed_on: bool = False, gseq: int = 0, from_slot: int | None = None,
                 from_pid: int | None = None):
        self.kind = kind  # type: ignore[misc] # per message here, per class elsewhere
        self.key, self.key_hash, self.unread, self.state = key, key_hash, unread, state
        self.peer, self.sent_ns, self.owner, self.epoch = peer, sent_ns, owner, epoch
        self.rank, self.last, self.passed_on, self.gseq = rank, last, passed_on, gseq
        self.from_slot, self.from_pid = from_slot, from_pid
        self.fds: list[int] = []

    def encode(self, version: int = VERSION) -> bytes:
        key = self.key
        if key is None:
            key_type, key_int, key_bytes = 0, 0, b""
        elif isinstance(key, int):
            key_type, key_int, key_bytes = 1, key, b""
        else:
            key_type, key_int, key_bytes = 2, 0, key
        peer = self.peer
        return CLIENT_FRAME.pack(
            version, self.kind, CLIENT.size + len(key_bytes) + len(self.state),
            key_type, key_int, self.key_hash,
            -1 if self.from_slot is None else self.from_slot, self.from_pid or 0,
            self.sent_ns, -1 if self.owner is None else self.owner, self.epoch, self.rank,
            (LAST if self.last else 0) | (PASSED_ON if self.passed_on else 0), self.gseq,
            NO_PEER if peer is None else pack_peer(peer), len(key_bytes), len(self.state),
        ) + key_bytes + self.state + self.unread

    @classmethod
    def decode(cls, data: bytes, meta_end: int, version: int) -> Message:
        if meta_end - HEADER.size < CLIENT.size:
            raise ValueError(f"client meta of {meta_end - HEADER.size} bytes, expected at "
                             f"least {CLIENT.size}")
        (_, kind, _, key_type, key_int, key_hash, from_slot, from_pid, sent_ns, owner, epoch,
         rank, flags, gseq, peer, key_len, state_len) = CLIENT_FRAME.unpack_from(data)
        start = CLIENT_FRAME.size
        if start + key_len + state_len != meta_end:
            raise ValueError("client: key and state lengths do not match the meta")
        if key_type == 0:
            key: Key | None = None
        elif key_type == 1:
            key = key_int
        elif key_type == 2:
            key = data[start:start + key_len]
        else:
            raise ValueError(f"client: key type {key_type}")
        return cls(CLIENT_KINDS[kind], key, key_hash, data[meta_end:],
                   data[start + key_len:meta_end],
                   None if peer == NO_PEER else unpack_peer(peer), sent_ns,
                   None if owner < 0 else owner, epoch, rank, bool(flags & LAST),
                   bool(flags & PASSED_ON), gseq, None if from_slot < 0 else from_slot,
                   from_pid or None)


# --- a chunk of a group's move -----------------------------------------------------------

CHUNK = struct.Struct("<IHBI")  # move, seq, flags (1: the last), total bytes of the move
CHUNK_FRAME = struct.Struct(HEADER.format + CHUNK.format[1:])


@dataclass
class MoveChunk(Message):
    """Part `seq` of move `move`'s transfer (wire/transfer.py): `total` bytes in all, of
    which these are `payload`; the members' fds ride with the chunks, in order."""
    kind: ClassVar[Kind] = Kind.MOVE_CHUNK
    move: int
    seq: int
    last: bool
    total: int
    payload: bytes

    def encode(self, version: int = VERSION) -> bytes:
        return CHUNK_FRAME.pack(version, self.kind, CHUNK.size, self.move, self.seq,
                                int(self.last), self.total) + self.payload

    @classmethod
    def decode(cls, data: bytes, meta_end: int, version: int) -> Message:
        if meta_end - HEADER.size != CHUNK.size:
            raise ValueError(f"MOVE_CHUNK meta of {meta_end - HEADER.size} bytes, expected "
                             f"{CHUNK.size}")
        _, _, _, move, seq, flags, total = CHUNK_FRAME.unpack_from(data)
        chunk = cls(move, seq, bool(flags & 1), total, data[meta_end:])
        chunk.fds = []
        return chunk


KINDS: dict[int, type[Message]] = {
    **{cls.kind: cls for cls in (Hello, Stats, GroupEnded, Moved, MoveFailed, MoveChunk,
                                 GroupInfo, Routes, Config, Retire, Stop, MoveOut, MoveDone,
                                 MoveAbort, ReopenLogs, GroupQuery)},
    Kind.HANDOFF: Client, Kind.ADOPT: Client}


def decode(data: bytes, fds: list[int], version: int = VERSION) -> Message:
    """Parse one datagram of `version` (the header's own must match); raises ValueError
    saying what is wrong with it. The fds stay the caller's on an error."""
    if len(data) < HEADER.size:
        raise ValueError(f"short message ({len(data)} bytes)")
    got, kind, meta_len = HEADER.unpack_from(data)
    if got != version:
        raise ValueError(f"version {got}, expected {version}")
    cls = KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown message type {kind}")
    meta_end = HEADER.size + meta_len
    if meta_end > len(data):
        raise ValueError("meta length past the end of the message")
    message = cls.decode(data, meta_end, version)
    message.fds = fds
    return message
