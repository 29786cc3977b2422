"""nbconn.lab.tlsrecords: TLS records from bytes (pure: real OpenSSL handshakes run over memory BIOs, no
socket), and once from a real capture over the lab's impaired link."""

import ssl

import pytest

from nbconn.lab import tlspeers, tlsrecords
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def pki():
    with tlspeers.test_pki() as made:
        yield made


def _handshake(pki, version, session=None, tickets=True):
    """A client and the lab's server context handshaking through memory BIOs: the bytes each side wrote,
    as flights [(direction, bytes)] ("out": client -> server).  Returns (flights, client SSLObject)."""
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
    cctx.minimum_version = cctx.maximum_version = tlspeers.TLS_VERSIONS[version]
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    client = cctx.wrap_bio(cin, cout, server_hostname="localhost", session=session)
    server = tlspeers.server_context(pki, tickets=tickets).wrap_bio(sin, sout, server_side=True)
    flights = []
    for _ in range(6):
        for obj, out, into, direction in ((client, cout, sin, "out"), (server, sout, cin, "in")):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            data = out.read()
            if data:
                into.write(data)
                flights.append((direction, data))
    return flights, client, cctx


def _names(records):
    return [" + ".join(r.messages) if r.messages else ("encrypted handshake" if r.content_type == 22 and r.encrypted
                                                       else r.type_name) for r in records]


def test_tls12_full_handshake_records(pki):
    flights, _, _ = _handshake(pki, "1.2")
    assert [d for d, _ in flights] == ["out", "in", "out", "in"]
    out = tlsrecords.parse(b"".join(b for d, b in flights if d == "out"))
    inn = tlsrecords.parse(b"".join(b for d, b in flights if d == "in"))
    assert _names(out) == ["ClientHello", "ClientKeyExchange", "change_cipher_spec", "encrypted handshake"]
    assert _names(inn)[:4] == ["ServerHello", "Certificate", "ServerKeyExchange", "ServerHelloDone"]
    assert _names(inn)[-2:] == ["change_cipher_spec", "encrypted handshake"]
    assert inn[0].chosen == "TLS 1.2" and "ServerHello (TLS 1.2)" in str(inn[0])
    assert all(r.version >> 8 == 3 for r in out + inn)
    assert sum(r.length + 5 for r in out) == sum(len(b) for d, b in flights if d == "out")


def test_tls13_everything_after_serverhello_is_application_data(pki):
    flights, _, _ = _handshake(pki, "1.3")
    out = tlsrecords.parse(b"".join(b for d, b in flights if d == "out"))
    inn = tlsrecords.parse(b"".join(b for d, b in flights if d == "in"))
    assert _names(out) == ["ClientHello", "change_cipher_spec", "application_data"]
    assert _names(inn)[:2] == ["ServerHello", "change_cipher_spec"] and inn[0].chosen == "TLS 1.3"
    assert set(_names(inn)[2:]) == {"application_data"} and all(r.encrypted for r in inn[2:])


def test_offered_session_goes_in_the_clienthello(pki):
    """A resumed ClientHello is still one clear ClientHello record (what changes is inside it)."""
    flights, client, cctx = _handshake(pki, "1.2")
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    again = cctx.wrap_bio(cin, cout, server_hostname="localhost", session=client.session)
    with pytest.raises(ssl.SSLWantReadError):
        again.do_handshake()
    [hello] = tlsrecords.parse(cout.read())
    assert hello.messages == ("ClientHello",) and not hello.encrypted


def test_records_split_across_segments_and_several_in_one(pki):
    flights, _, _ = _handshake(pki, "1.2")
    data = b"".join(b for d, b in flights if d == "in")
    whole = tlsrecords.parse(data)
    stream = tlsrecords.Stream()
    for i in range(0, len(data), 7):  # 7-byte pieces: headers and handshake headers cut everywhere
        stream.feed(data[i:i + 7])
    assert stream.records == whole and stream.buffer == b""


def test_bytes_that_are_not_tls_are_refused_naming_the_offset():
    with pytest.raises(ValueError, match="offset 0"):
        tlsrecords.parse(b"GET / HTTP/1.1\r\n")
    with pytest.raises(TypeError):
        tlsrecords.Stream().feed("text")


def test_partial_record_waits_for_the_rest():
    record = bytes([22, 3, 3, 0, 8]) + bytes([14, 0, 0, 0]) + bytes([14, 0, 0, 0])
    assert tlsrecords.parse(record[:-1]) == []
    [r] = tlsrecords.parse(record)
    assert r.messages == ("ServerHelloDone", "ServerHelloDone") and r.length == 8


def test_handshake_message_spanning_records_is_named_once():
    body = bytes([11, 0, 0, 10]) + bytes(10)  # Certificate, 10 bytes of body
    first = bytes([22, 3, 3, 0, 6]) + body[:6]
    second = bytes([22, 3, 3, 0, 8]) + body[6:]
    a, b = tlsrecords.parse(first + second)
    assert a.messages == ("Certificate",) and b.messages == ()


def test_stream_of_orders_drops_repeats_and_stops_at_a_gap():
    segs = [(1000, b"abc"), (1006, b"ghi"), (1003, b"def"), (1003, b"def"), (1012, b"xyz")]
    assert tlsrecords.stream_of(segs) == [(0, b"abc"), (3, b"def"), (6, b"ghi")]
    wrapped = [((1 << 32) - 2, b"ab"), (0, b"cd")]
    assert tlsrecords.stream_of(wrapped) == [(0, b"ab"), (2, b"cd")]
    assert tlsrecords.stream_of([(5, b"")]) == []


class _Seg:
    """A captured segment's fields that tlsrecords reads (nbconn.lab.capture.Packet's names)."""

    def __init__(self, direction, seq, data):
        self.dir, self.seq, self.data, self.payload = direction, seq, data, len(data)


def _segments(flights):
    """The memory-BIO flights as segments, one per flight, with running sequence numbers per direction."""
    seq, segs = {"out": 1000, "in": 5000}, []
    for direction, data in flights:
        segs.append(_Seg(direction, seq[direction], data))
        seq[direction] += len(data)
    return segs


@pytest.mark.parametrize("version, expected", [("1.3", 1), ("1.2", 2)], ids=["1.3", "1.2"])
def test_handshake_round_trips_from_segments_alone(pki, version, expected):
    """TLS 1.3: out, in, out and then the tickets (in): one round trip; TLS 1.2: two.  A close_notify after the
    handshake adds none."""
    flights, _, _ = _handshake(pki, version)
    segs = _segments(flights)
    assert tlsrecords.handshake_round_trips(segs) == expected
    last_out = [seg for seg in segs if seg.dir == "out"][-1]
    alert = _Seg("out", last_out.seq + len(last_out.data), bytes([21, 3, 3, 0, 2, 1, 0]))
    assert tlsrecords.handshake_round_trips(segs + [alert]) == expected
    assert tlsrecords.handshake_round_trips(segs[:1]) is None  # only the ClientHello: not finished


def test_round_trips_count_out_then_in_changes():
    assert tlsrecords.round_trips([]) == 0
    assert tlsrecords.round_trips(["out", "in", "out"]) == 1  # TLS 1.3 full, or resumed
    assert tlsrecords.round_trips(["out", "in", "in", "out", "in"]) == 2  # TLS 1.2 full
    assert tlsrecords.flights(["out", "out", "in"]) == [("out", 2), ("in", 1)]
    with pytest.raises(ValueError, match="sideways"):
        tlsrecords.flights(["sideways"])


@pytest.mark.slow
def test_capture_over_the_link_shows_the_records(pki):
    """A real TLS 1.2 handshake across the 20 ms link, captured with payload: the records are read from the
    segments, and their data flights up to both Finished messages make two round trips."""
    from nbconn.nginx import tls
    from nbconn.experiments import nb15
    from nbconn.lab import wire
    from nbconn.lab.capture import Capture

    why = wire.wire_unavailable_reason()
    if why is not None:
        pytest.skip(why)
    with wire.impaired(delay_ms=20.0) as link, nb15.tls_server_across(link, pki) as peer:
        with Capture(peer.port, interface=None, source=link.client_ns, payload=True) as cap:
            with link.client():
                result = tls.connect_tls(peer, tls.TLSClient(cafile=pki.cafile, server_name="nbconn.test",
                                                              tls_version="1.2"), timeout=5.0)
            # the client's FIN (an RST when the server's records were still unread) follows its close()
            assert wait_for(lambda: cap.read() is not None and any(("F" in p.flags or "R" in p.flags)
                                                                   and p.dir == "out" for p in cap.packets))
            [conn] = nb15.connections(cap.packets)
    assert result.outcome == "handshaked" and result.version == "TLSv1.2"
    names = [m for _p, r in tlsrecords.records_of(conn) for m in r.messages]
    assert names[:2] == ["ClientHello", "ServerHello"] and "ClientKeyExchange" in names
    assert tlsrecords.handshake_round_trips(conn) == 2
