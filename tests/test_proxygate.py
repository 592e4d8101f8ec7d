"""The worker's side of server.proxy_protocol (mpd.proxygate): which addresses may send a
PROXY header, the deadlines of headers still on their way, the log line and counter of
every client turned away, and the real address packed for a hand-off."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpd.config.schema import Config
from mpd.logs import log as logmod
from mpd.wire.peer import PEER, format_peer, pack_peer, unpack_peer
from mpd.worker.proxy import ProxyError, ProxyHeader
from mpd.worker.proxygate import ProxyGate, Sources, network


@dataclass(eq=False)
class Conn:  # what the gate needs of a worker's connection
    fd: int
    header_due: float = 0.0


def gate(**settings) -> ProxyGate:
    return ProxyGate(Config(proxy_protocol=True, **settings))


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --- who may send a header -----------------------------------------------------------------

@pytest.mark.parametrize("host, allowed", [
    ("127.0.0.1", True), ("127.255.255.254", True), ("::1", True),
    ("::ffff:127.0.0.1", True),  # an IPv4 proxy seen through an IPv6 listener
    ("10.0.0.1", False), ("::2", False), ("::ffff:10.0.0.1", False), ("128.0.0.1", False),
    ("not an address", False), ("", False),
])
def test_by_default_only_loopback_may_send_a_header(host: str, allowed: bool):
    assert gate().admits((host, 40000)) is allowed


def test_networks_and_single_addresses_of_both_families():
    sources = Sources(["10.1.0.0/16", "192.0.2.7", "2001:db8::/32"])
    assert sources.allows("10.1.200.3") and sources.allows("192.0.2.7")
    assert sources.allows("2001:db8:1::5")
    assert not sources.allows("10.2.0.1") and not sources.allows("192.0.2.8")
    assert not sources.allows("2001:db9::1") and not sources.allows("127.0.0.1")


def test_an_empty_list_admits_no_one():
    assert not Sources([]).allows("127.0.0.1")


def test_the_gate_takes_a_reload():
    g = gate()
    assert not g.admits(("10.0.0.9", 1))
    g.apply(Config(proxy_from=("10.0.0.0/8",), proxy_timeout=0.5))
    assert g.admits(("10.0.0.9", 1)) and not g.admits(("127.0.0.1", 1))
    assert g.timeout == 0.5


def test_an_accept_address_that_is_no_tuple_is_not_admitted():
    assert not gate().admits("/run/some.sock")  # a unix peer: no address to trust


@pytest.mark.parametrize("entry, message", [
    ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; the network is 10.0.0.0/8"),
    ("localhost", "'localhost' is not an IP address or network"),
    ("10.0.0.0/33", "is not an IP address or network"),
    ("::1/129", "is not an IP address or network"),
])
def test_a_bad_entry_says_what_is_wrong(entry: str, message: str):
    with pytest.raises(ValueError) as error:
        network(entry)
    assert message in str(error.value)


# --- deadlines -----------------------------------------------------------------------------

def test_headers_past_their_deadline_are_reported_once_in_order():
    g = gate(proxy_timeout=3.0)
    a, b, c = Conn(5), Conn(6), Conn(7)
    for conn, now in ((a, 100.0), (b, 101.0), (c, 102.0)):
        conn.header_due = g.expect(conn, now)
    conns = {5: a, 6: b, 7: c}
    assert g.next_due == 103.0
    assert list(g.overdue(102.9, conns)) == []
    assert list(g.overdue(104.0, conns)) == [a, b]
    assert list(g.overdue(104.0, conns)) == []
    assert g.next_due == 105.0
    assert list(g.overdue(200.0, conns)) == [c]
    assert g.next_due == float("inf")


def test_finished_closed_or_replaced_connections_are_skipped():
    g = gate(proxy_timeout=1.0)
    done, gone, old, still = Conn(5), Conn(6), Conn(7), Conn(8)
    for conn in (done, gone, old, still):
        conn.header_due = g.expect(conn, 10.0)
    done.header_due = 0.0  # its header completed
    new = Conn(7)  # fd 7 closed, then reused by a new client
    new.header_due = g.expect(new, 10.5)
    conns = {5: done, 7: new, 8: still}  # fd 6 closed
    assert list(g.overdue(11.0, conns)) == [still]
    assert [fd for _due, fd in g.waiting] == [7]  # the new client's
    assert list(g.overdue(11.5, conns)) == [new]


# --- turning clients away -------------------------------------------------------------------

@pytest.fixture
def json_log(capfd):
    logmod.configure("debug", "json", "stdout")
    yield capfd
    logmod.configure("info")


def test_every_rejection_is_counted_and_logged_with_its_reason(json_log):
    g = gate(proxy_timeout=2.5)
    peer = ("10.9.8.7", 5555)
    g.reject_untrusted(11, peer)
    g.reject_malformed(12, ("127.0.0.1", 6000), ProxyError("not a PROXY protocol header: x"))
    g.reject_timeout(13, ("::1", 7000))
    assert g.rejected == 3
    lines = json_lines(json_log.readouterr().out)
    assert [(e["event"], e["level"], e["fd"], e["peer"], e["reason"]) for e in lines] == [
        ("client.proxy_rejected", "warning", 11, "10.9.8.7:5555", "untrusted"),
        ("client.proxy_rejected", "warning", 12, "127.0.0.1:6000", "malformed"),
        ("client.proxy_rejected", "warning", 13, "[::1]:7000", "timeout")]
    assert "10.9.8.7:5555 is not in server.proxy_from" in lines[0]["error"]
    assert "not a PROXY protocol header: x" in lines[1]["error"]
    assert "clients must come through the proxy" in lines[1]["error"]
    assert "within server.proxy_timeout (2.5 s)" in lines[2]["error"]


def test_a_complete_header_gives_the_real_client_and_a_debug_line(json_log):
    g = gate()
    header = ProxyHeader(2, "PROXY", ("203.0.113.9", 41000), ("198.51.100.1", 1990), 28)
    assert g.admitted(9, ("127.0.0.1", 50000), header) == ("203.0.113.9", 41000)
    local = ProxyHeader(2, "LOCAL", None, None, 16)
    assert g.admitted(10, ("127.0.0.1", 50001), local) is None
    lines = json_lines(json_log.readouterr().out)
    assert [(e["event"], e["client"], e["proxy"], e["command"]) for e in lines] == [
        ("client.proxied", "203.0.113.9:41000", "127.0.0.1:50000", "PROXY"),
        ("client.proxied", None, "127.0.0.1:50001", "LOCAL")]


def test_peers_are_formatted_for_logs():
    assert format_peer(("1.2.3.4", 5)) == "1.2.3.4:5"
    assert format_peer(("2001:db8::1", 5)) == "[2001:db8::1]:5"
    assert format_peer(None) is None


# --- the real address through a hand-off ----------------------------------------------------

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
peers = st.none() | st.tuples(ipv4 | ipv6, st.integers(0, 65535))


@settings(max_examples=500, deadline=None)
@given(peers)
def test_a_peer_survives_packing_in_a_fixed_size(peer):
    data = pack_peer(peer)
    assert len(data) == PEER.size == 19
    assert unpack_peer(data) == peer


@pytest.mark.parametrize("data, message", [
    (b"\x05" + b"\0" * 18, "family 5"),
    (b"\x04" + b"\0" * 10, "of 11 bytes"),
])
def test_bytes_no_packing_made_are_refused(data: bytes, message: str):
    with pytest.raises(ValueError) as error:
        unpack_peer(data)
    assert message in str(error.value)
