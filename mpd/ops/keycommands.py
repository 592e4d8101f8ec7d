"""Control commands about keys and their groups: `where` (which slot and worker serve a
key, and its group's members), `move` (an operator moves a hot key's group to another
slot) and `drain` / `undrain` (every group off a slot, without scaling). Each is an entry
of commands.COMMANDS; what it does in the daemon is the master's moves part
(master/moves.py).

A KEY on mpdctl's command line is an int when it is one (`42`, `-7`: the seed's int32
keys), else its text's UTF-8 bytes (a room's or a stream's name); `text:42` and
`hex:00ff` say which when it matters."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable

from mpd.wire.messages import key_from_json, key_to_json
from mpd.wire.routing import Key, normalize, show

Reply = dict[str, Any]
WHERE_WAIT = 2.0  # seconds mpdctl waits for the group's worker to say its members


def parse_key(text: str) -> Key:
    if text.startswith("text:"):
        return normalize(text[5:])
    if text.startswith("hex:"):
        try:
            return normalize(bytes.fromhex(text[4:]))
        except ValueError:
            raise ValueError(f"{text!r}: not hex") from None
    try:
        return normalize(int(text))
    except ValueError:
        return normalize(text)


def key_argument(arg: str | None) -> dict[str, Any]:
    if not arg:
        raise ValueError("takes a KEY (an int, text, text:..., hex:...)")
    return {"key": key_to_json(parse_key(arg))}


def key_and_slot_argument(arg: str | None) -> dict[str, Any]:
    key, _, slot = (arg or "").rpartition(" ")
    if not key or not slot.isdigit():
        raise ValueError("takes KEY SLOT (for example: move room-7 2)")
    return {**key_argument(key), "slot": int(slot)}


def slot_argument(arg: str | None) -> dict[str, Any]:
    if arg is None or not arg.isdigit():
        raise ValueError("takes a SLOT number")
    return {"slot": int(arg)}


def request_key(request: dict[str, Any]) -> Key:
    key = key_from_json(request.get("key"))
    if key is None:
        raise ValueError('expected "key": {"int": N} or {"hex": "..."}')
    return normalize(key)


# --- in the daemon ----------------------------------------------------------------------

def where(daemon: Any, request: dict[str, Any]) -> Reply:
    try:
        key = request_key(request)
    except (ValueError, TypeError) as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, **daemon.where(key)}


def move(daemon: Any, request: dict[str, Any]) -> Reply:
    try:
        key = request_key(request)
    except (ValueError, TypeError) as e:
        return {"ok": False, "error": str(e)}
    slot = request.get("slot")
    if type(slot) is not int:
        return {"ok": False, "error": 'expected "slot": N'}
    why_not = daemon.move(key, slot)
    return {"ok": False, "error": why_not} if why_not else {"ok": True, "key": show(key),
                                                            "slot": slot}


def drain(daemon: Any, request: dict[str, Any], drained: bool = True) -> Reply:
    slot = request.get("slot")
    if type(slot) is not int:
        return {"ok": False, "error": 'expected "slot": N'}
    why_not = daemon.drain(slot, drained)
    return {"ok": False, "error": why_not} if why_not else {"ok": True, "slot": slot,
                                                            "drained": drained}


def undrain(daemon: Any, request: dict[str, Any]) -> Reply:
    return drain(daemon, request, drained=False)


# --- in mpdctl ------------------------------------------------------------------------------

def show_where(reply: Reply) -> str:
    key = reply["key"]
    if not reply.get("placed"):
        where = (f"key {key!r}: no group on this host; its owner here is slot "
                 f"{reply['owner_slot']}")
        return where + (f" (pid {reply['pid']})" if reply.get("pid") else " (no worker now)")
    members = reply.get("members")
    line = (f"key {key!r}: slot {reply['slot']} (pid {reply['pid']}), "
            f"{'?' if members is None else members} members")
    if reply.get("pin") is not None:
        line += f", pinned to slot {reply['pin']}"
    if reply.get("moving"):
        line += ", moving"
    if reply["slot"] != reply["owner_slot"] and reply.get("pin") is None:
        line += f" (its owner is slot {reply['owner_slot']}: it moves there)"
    return line


def ask_where(send: Callable[..., Reply], fields: dict[str, Any]) -> Reply:
    """`where`, asked again while the group's worker has not said its members yet (the
    master asks it: GROUP_QUERY), for WHERE_WAIT at most."""
    deadline = time.monotonic() + WHERE_WAIT
    reply = send("where", **fields)
    while reply.get("ok") and reply.get("placed") and reply.get("members") is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)  # a poll interval, bounded by WHERE_WAIT
        reply = send("where", **fields)
    return reply


def where_view(send: Callable[..., Reply], args: Any) -> int:
    """`mpdctl where KEY`."""
    return shown(args, ask_where(send, key_argument(args.argument)), show_where)


def move_view(send: Callable[..., Reply], args: Any) -> int:
    """`mpdctl move KEY SLOT`: asked, then waited for: the key's group is served in SLOT
    (or its move failed: the reason)."""
    fields = key_and_slot_argument(args.argument)
    reply = send("move", **fields)
    deadline = time.monotonic() + args.timeout
    while reply.get("ok"):
        where = send("where", key=fields["key"])
        if where.get("ok") and where.get("slot") == fields["slot"] and not where["moving"]:
            return shown(args, ask_where(send, {"key": fields["key"]}), show_where)
        if where.get("ok") and not where["moving"] and where.get("failed"):
            reply = {"ok": False, "error": f"the move failed: {where['failed']}"}
        elif time.monotonic() > deadline:
            reply = {"ok": False, "error": f"not done after {args.timeout:g} s: "
                     f"{show_where(where) if where.get('ok') else where.get('error')}"}
        else:
            time.sleep(0.02)  # a poll interval, bounded by --timeout
    return shown(args, reply, show_where)


def shown(args: Any, reply: Reply, show: Callable[[Reply], str]) -> int:
    if not reply.get("ok"):
        print(f"mpdctl: {args.command}: {reply.get('error')}", file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2) if args.json else show(reply))
    return 0


def drain_done(reply: Reply, status: Reply) -> bool:
    """No group is left on the slot (by the workers' last heartbeats) and none moves."""
    slot_groups = sum(w.get("groups", 0) for w in status["workers"]
                      if w["slot"] == reply["slot"] and w["state"] == "ready")
    moving = status["master"].get("groups", {}).get("under_way", 0)
    return not reply["drained"] or (slot_groups == 0 and not moving)
