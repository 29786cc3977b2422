"""TLS records in the packet capture: bytes in, records out (pure: no sockets, no clock).

A TLS connection is two byte streams, and each is a sequence of *records* (RFC 8446 section 5.1,
RFC 5246 section 6.2): a 5-byte header -- content type (1 byte), legacy version (2), length (2) -- then
``length`` bytes.  A record can span TCP segments and a segment can hold several records, so the
records are read from each direction's stream put back together by sequence number
(:func:`stream_of`), not from one segment at a time.

What can be read without keys:

* the header of every record: 20 change_cipher_spec, 21 alert, 22 handshake, 23 application_data;
* inside a handshake record sent *before* its sender's ChangeCipherSpec, the handshake messages'
  types (1 byte type, 3 bytes length each): ClientHello, ServerHello, Certificate, ServerKeyExchange,
  ServerHelloDone, ClientKeyExchange...; and in a ServerHello, the version the server chose
  (the supported_versions extension, 43, for TLS 1.3; else the legacy field);
* after a side's ChangeCipherSpec its handshake records are encrypted (TLS 1.2: the Finished, shown
  as "encrypted handshake"); TLS 1.3 sends everything after the ServerHello as application_data
  records (RFC 8446 section 5.2: the real type is inside the encryption), shown with their length
  only.  The ChangeCipherSpec a TLS 1.3 peer sends is the middlebox-compatibility one (appendix D.4).

:func:`flights` and :func:`round_trips` read the conversation's shape from segments that carry data:
a flight is a run of data segments in one direction; a round trip is the client's flight answered by
a server flight.  :func:`handshake_round_trips` counts them up to where the handshake ends for the client.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data", 24: "heartbeat"}
VERSIONS = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2", 0x0304: "TLS 1.3"}
#: handshake message types (RFC 8446 section 4, RFC 5246 section 7.4)
HANDSHAKE_TYPES = {0: "HelloRequest", 1: "ClientHello", 2: "ServerHello", 4: "NewSessionTicket",
                   5: "EndOfEarlyData", 8: "EncryptedExtensions", 11: "Certificate", 12: "ServerKeyExchange",
                   13: "CertificateRequest", 14: "ServerHelloDone", 15: "CertificateVerify",
                   16: "ClientKeyExchange", 20: "Finished", 22: "CertificateStatus", 24: "KeyUpdate"}
HEADER = 5
MAX_RECORD = (1 << 14) + 2048  # TLSCiphertext.length may exceed 2^14 by at most 2048 (RFC 5246 6.2.3)
_SUPPORTED_VERSIONS = 43


@dataclass(frozen=True)
class Record:
    """One TLS record: ``offset`` in its direction's stream, header fields, and what the clear part says.

    ``messages``: handshake message names in a clear handshake record (a message whose header begins
    in this record); ``encrypted``: the body cannot be read (application_data, or a handshake record
    after its sender's ChangeCipherSpec); ``chosen``: the version a ServerHello chose, when seen."""

    offset: int
    content_type: int
    version: int
    length: int
    messages: tuple = ()
    encrypted: bool = False
    chosen: str | None = None

    @property
    def type_name(self) -> str:
        return CONTENT_TYPES.get(self.content_type, f"type {self.content_type}")

    def __str__(self) -> str:
        version = VERSIONS.get(self.version, f"0x{self.version:04x}")
        if self.messages:
            what = " + ".join(self.messages) + (f" ({self.chosen})" if self.chosen else "")
        elif self.content_type == 22 and self.encrypted:
            what = "encrypted handshake"
        else:
            what = self.type_name
        return f"{what} [{self.type_name}, {version}, {self.length} bytes]"


@dataclass
class Stream:
    """One direction's records, read incrementally: :meth:`feed` bytes in stream order."""

    records: list = field(default_factory=list)
    buffer: bytes = b""
    offset: int = 0  # stream offset of buffer[0]
    encrypted: bool = False  # this side sent its ChangeCipherSpec (or a TLS 1.3 application_data)
    _partial: bytes = b""  # a handshake message header split across records
    _skip: int = 0  # handshake body bytes still to skip before the next message header

    def feed(self, data: bytes) -> list:
        """Add ``data``; return the records completed by it.  Raises ValueError on bytes that are not TLS."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        self.buffer += bytes(data)
        done = []
        while len(self.buffer) >= HEADER:
            ctype, version, length = struct.unpack_from("!BHH", self.buffer, 0)
            if ctype not in CONTENT_TYPES or version >> 8 != 3 or length > MAX_RECORD:
                raise ValueError(f"not a TLS record header at stream offset {self.offset}: "
                                 f"{self.buffer[:HEADER].hex()}")
            if len(self.buffer) < HEADER + length:
                break
            body = self.buffer[HEADER:HEADER + length]
            record = self._record(ctype, version, body)
            done.append(record)
            self.records.append(record)
            self.buffer = self.buffer[HEADER + length:]
            self.offset += HEADER + length
        return done

    def _record(self, ctype: int, version: int, body: bytes) -> Record:
        if ctype == 20:
            self.encrypted = True  # everything this side sends after it is protected
        if ctype != 22 or self.encrypted:
            return Record(self.offset, ctype, version, len(body), encrypted=ctype in (22, 23) and
                          (ctype == 23 or self.encrypted))
        names, chosen = [], None
        data, i = self._partial + body, 0
        self._partial = b""
        if self._skip:
            i = min(self._skip, len(data))
            self._skip -= i
        while i < len(data):
            if len(data) - i < 4:
                self._partial = data[i:]
                break
            mtype = data[i]
            mlen = int.from_bytes(data[i + 1:i + 4], "big")
            names.append(HANDSHAKE_TYPES.get(mtype, f"handshake type {mtype}"))
            if mtype == 2:
                chosen = server_hello_version(data[i + 4:i + 4 + mlen])
            end = i + 4 + mlen
            if end > len(data):
                self._skip = end - len(data)
                break
            i = end
        return Record(self.offset, ctype, version, len(body), tuple(names), False, chosen)


def server_hello_version(body: bytes) -> str | None:
    """The version a ServerHello body chose: supported_versions (43) if present, else legacy_version.
    None when the body is cut short before it says."""
    try:
        legacy = struct.unpack_from("!H", body, 0)[0]
        i = 2 + 32  # legacy_version, random
        i += 1 + body[i]  # session id
        i += 2 + 1  # cipher suite, compression method
        if i == len(body):
            return VERSIONS.get(legacy)
        end = i + 2 + struct.unpack_from("!H", body, i)[0]
        i += 2
        while i + 4 <= end:
            etype, elen = struct.unpack_from("!HH", body, i)
            if etype == _SUPPORTED_VERSIONS and elen == 2:
                return VERSIONS.get(struct.unpack_from("!H", body, i + 4)[0])
            i += 4 + elen
        return VERSIONS.get(legacy)
    except (struct.error, IndexError):
        return None


def parse(data: bytes) -> list:
    """The complete records in one direction's stream (trailing partial bytes are left out)."""
    return Stream().feed(data)


# -- from segments ---------------------------------------------------------------------------------

def stream_of(segments) -> list:
    """One direction's TCP payload put back in order: ``segments`` are (seq, data) pairs (any order,
    repeats allowed).  Returns [(stream_offset, data)] for the bytes in sequence from the first byte on;
    a gap (a segment the capture missed) ends it.  Sequence numbers wrap at 2**32."""
    segs = [(seq, bytes(data)) for seq, data in segments if data]
    if not segs:
        return []
    # wrap: order by distance from the first segment's seq (a handshake is far smaller than 2**31)
    first = segs[0][0]
    keyed = sorted(((seq - first) % (1 << 32), data) for seq, data in segs)
    base = keyed[0][0]
    out, expected = [], base
    for rel, data in keyed:
        if rel + len(data) <= expected:
            continue  # a repeat (retransmission) of bytes already placed
        if rel > expected:
            break  # a gap
        data = data[expected - rel:]
        out.append((expected - base, data))
        expected += len(data)
    return out


def records_by_segment(segments) -> list:
    """[(index of the segment that completed it, Record)] for one direction: ``segments`` in capture order
    as (seq, data) pairs.  A record is shown at the segment carrying its last byte."""
    placed = stream_of(segments)
    if not placed:
        return []
    first = next(seq for seq, data in segments if data)
    segs = [((seq - first) % (1 << 32), len(data)) for seq, data in segments]
    base = min(rel for (rel, n) in segs if n)
    stream = Stream()
    for _offset, data in placed:
        stream.feed(data)
    result = []
    for record in stream.records:
        last = record.offset + HEADER + record.length  # stream offset one past the record
        index = next((i for i, (rel, n) in enumerate(segs) if n and rel - base < last <= rel - base + n), None)
        result.append((index, record))
    return result


def records_of(packets) -> list:
    """[(packet, Record)] for one connection's captured segments (:class:`nbconn.lab.capture.Packet` with
    ``data``: a ``Capture(payload=True)``), both directions, in capture order: each record beside the
    segment that carried its last byte."""
    found = []
    for direction in ("out", "in"):
        segs = [p for p in packets if p.dir == direction]
        for index, record in records_by_segment([(p.seq, p.data) for p in segs]):
            if index is not None:
                found.append((segs[index], record))
    order = {id(p): i for i, p in enumerate(packets)}
    found.sort(key=lambda pr: (order[id(pr[0])], pr[1].offset))
    return found


def flights(directions) -> list:
    """Runs of data-carrying segments in one direction: ``directions`` is a sequence of "out"/"in" (one per
    segment with payload, in time order); returns [(direction, count)]."""
    runs: list = []
    for d in directions:
        if d not in ("out", "in"):
            raise ValueError(f"direction {d!r} is not 'out' or 'in'")
        if runs and runs[-1][0] == d:
            runs[-1][1] += 1
        else:
            runs.append([d, 1])
    return [(d, n) for d, n in runs]


def round_trips(directions) -> int:
    """How many times the client's data was answered by the server's: the out -> in changes between
    data flights.  (The TCP handshake carries no data and is not counted.)"""
    runs = flights(directions)
    return sum(1 for a, b in zip(runs, runs[1:]) if a[0] == "out" and b[0] == "in")


def handshake_round_trips(packets) -> int | None:
    """The round trips of one connection's TLS handshake, from its captured segments alone (``Packet`` with
    ``data``, capture order): :func:`round_trips` of the data segments up to where the handshake ends for the
    client -- when it has both sent its Finished and received the server's.  Each side's Finished is its first
    record after its own change_cipher_spec (TLS 1.2: the encrypted handshake record; TLS 1.3: the first
    application_data record, the compatibility change_cipher_spec coming just before it; in TLS 1.3 the server's
    first encrypted record is EncryptedExtensions, in the same flight as its Finished, which ends sooner than the
    client's Finished in any case).  What follows -- TLS 1.3's session tickets, a close_notify -- is not counted.
    None when either side's change_cipher_spec is not in the capture (the handshake did not finish)."""
    pairs = records_of(packets)

    def first_after_ccs(direction):
        seen = False
        for packet, record in pairs:
            if packet.dir != direction:
                continue
            if seen:
                return packet
            seen = record.content_type == 20
        return None

    client_finished, server_finished = first_after_ccs("out"), first_after_ccs("in")
    if client_finished is None or server_finished is None:
        return None
    order = {id(p): i for i, p in enumerate(packets)}
    end = max(order[id(client_finished)], order[id(server_finished)])
    return round_trips([p.dir for p in packets[:end + 1] if p.payload])


__all__ = ["handshake_round_trips", "Record", "Stream", "parse", "stream_of", "records_by_segment",
           "records_of", "flights", "round_trips",
           "server_hello_version", "CONTENT_TYPES", "HANDSHAKE_TYPES", "VERSIONS"]
