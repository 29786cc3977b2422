"""An impaired network link built in userspace: delay, jitter and loss.

Why this module exists
----------------------
To watch nginx's non-blocking ``connect()`` flow behave the way it does on a
real network (``EINPROGRESS``, a writable event one round trip later, SYN
retransmissions after loss, ``connect_timeout`` firing) we need a network
with a *round-trip time* and *packet loss*.  Loopback has neither: a TCP
handshake on ``127.0.0.1`` finishes in tens of microseconds, before the
event loop even gets to wait.

The usual tool is ``tc qdisc add ... netem delay 10ms loss 30%``.  The kernel
this tutorial runs on is built without the netem qdisc (``sch_netem``), and
we cannot load modules, so we build the same thing in userspace instead.

The pieces
~~~~~~~~~~
*TUN device.*  ``/dev/net/tun`` lets a process create a network interface
whose "wire" is a file descriptor.  With ``IFF_TUN | IFF_NO_PI`` every IP
packet the kernel routes *out of* the interface can be ``read()`` from the
fd as one whole packet (no Ethernet header, no extra prefix), and every
packet ``write()``-n to the fd is received *by* the kernel as if it had just
arrived on that interface.  Whoever holds the fd is the cable.

*Two network namespaces.*  Made by the lab's helper process (:mod:`nbconn.lab.child`),
as a normal user inside a user namespace of its own ("root" there, like ``unshare
-Urn``), as root without one; nothing is named in the file system.  If both ends of
the connection lived in one
namespace the kernel would notice that the destination address is local and
short-circuit the packet through loopback, never touching our interface.  So
we make two fresh namespaces, ``client`` and ``server``, each with its own
TUN device, address and route to the other side (198.18.0.1 <-> 198.18.0.2,
from the RFC 2544 benchmarking range, so nothing here can collide with or
leak to a real network).  A packet from a client socket to the server address
can then only leave through the client's TUN device.

*A router, on request.*  ``impaired(router="unreachable")`` (or ``"prohibit"``,
``"blackhole"``) routes 198.19.0.0/24 (``FAR_PREFIX``) from the client via 198.18.0.2;
the server namespace forwards (``ip_forward=1``) and holds a route of that type for
it.  A SYN to ``link.far_addr`` then crosses the wire and meets the route there: the
kernel answers ICMP host unreachable or administratively prohibited (``ip_error``,
net/ipv4/route.c), or drops it without a word (blackhole).

*The forwarder.*  One small process (:mod:`.forwarder`, forked by the helper, every
capability dropped) holds both TUN fds.  It reads a
packet from one, decides its fate, and later writes it, unchanged, into the
other.  The fate is decided when the packet is read:

* with probability ``loss`` it is dropped (counted, never written);
* otherwise it gets a *due time*: ``now + delay (+ uniform jitter)``.

Packets wait in a heap ordered by ``(due time, arrival sequence number)``.
The forwarder sleeps in ``ppoll()`` on both TUN fds and a control socket,
with a timeout equal to the time until the earliest due packet, so it wakes
either because a new packet arrived or because the head of the heap is due;
it never spins.  With zero jitter the due times in one direction are
non-decreasing and ties are broken by sequence number, so packet order is
preserved; with jitter, packets may be reordered, as on a real path.  Every
random choice comes from a seeded RNG per direction, so ``seed=`` makes the
drop pattern reproducible.

Timing details.  ``ppoll`` is called through :mod:`ctypes` because Python's
``select.poll``/``select.epoll`` only take millisecond timeouts, and rounding
every wake-up up to the next millisecond would add ~0.5 ms per packet.  The
forwarder sets its timer slack to 1 ns (``prctl(PR_SET_TIMERSLACK)``),
otherwise the kernel may defer its wake-ups by up to 50 us to batch them.
Even so a timed wake-up lands tens of microseconds late, so the forwarder
keeps a moving average of that overshoot and asks to be woken that much
early, releasing packets due within the allowance (never more than
``MAX_WAKE_ALLOWANCE_S``, 0.5 ms, early).  The *average* delay then matches
the requested one instead of being biased late.

Connecting over it
~~~~~~~~~~~~~~~~~~
The notebook's process never enters the namespaces.  ``with link.client():`` makes
step 1 of every nbconn connect in the thread ask the helper for a socket made in the
client namespace; the descriptor arrives over SCM_RIGHTS (:mod:`nbconn.socketsource`)
and the trace says so.  ``link.client_ns.socket(...)`` / ``link.server_ns.socket(...)``
hand out such sockets directly; ``link.serve_listener()`` listens in the server
namespace with the lab peers' acceptor running here.

Rooms: :mod:`.params` (checks), :mod:`nbconn.lab.probe` (why it cannot run here, and
the fix), :mod:`.forwarder` (the child's loop, stdlib only), :mod:`nbconn.lab.control`
(the parent's handle on the helper), :mod:`.link` (the Link and ``impaired()``).

Overhead and limits
~~~~~~~~~~~~~~~~~~~
Measured on the tutorial machine (2 vCPUs in a Firecracker VM, Linux 6.18,
Python 3.11), idle apart from the measurement:

* Accuracy: with ``delay_ms=10`` the median handshake (``connect()`` until
  writable, timed from Python with epoll) is 20.15-20.25 ms and
  ``tcpi_rtt`` 20.05-20.15 ms, i.e. about 1 % high.  Still within 1 % with both
  cores saturated by other busy processes.
* Lateness (write time minus due time) at light load: mean 30-50 us,
  median 10-30 us, p99 200-400 us.  Two sources: wake-up jitter of the VM's
  timers (40-100 us), and the kernel processing each written packet inside
  ``write()`` (TCP input, waking the receiver), which delays the next packet
  of the same burst by ~5-50 us.
* Overhead of the wire itself: with ``delay_ms=0`` a handshake takes a
  median ~60 us versus ~14 us over loopback inside one namespace, so the
  wire adds ~25 us per packet (a read, a heap push/pop, a write, two
  wake-ups).
* Rate: ~6,000-7,000 sequential connects/s at ``delay_ms=0`` (the Python
  client loop is the limit).  Paced 64-byte UDP at ``delay_ms=10``: mean
  lateness 55 us at 20 k packets/s, 150 us at 50 k/s, 400 us (p99 2.7 ms)
  at 100 k/s.  The forwarder saturates one core at roughly 80-160 k
  packets/s; beyond that the TUN queue (500 packets) overflows and the
  kernel drops before the wire sees the packets.
* Setup and teardown: see the numbers in the README (one interpreter start for the
  helper; the forwarder is forked).
* At most ``QUEUE_LIMIT`` packets wait in the heap; more are dropped and
  counted as ``overflow_dropped``.  Delay is capped at ``MAX_DELAY_MS``.
* ``stats()`` keys: ``out_forwarded``/``back_forwarded``, ``out_dropped``/
  ``back_dropped`` (out = client -> server), ``overflow_dropped``,
  ``write_errors``, ``queued``, ``mean_lateness_us``, ``p50_lateness_us``,
  ``p99_lateness_us`` (last ``LATENESS_WINDOW`` packets), ``max_lateness_us``,
  ``wake_allowance_us``, ``forwarder_error``, ``forwarder_alive``,
  ``listener_accepted``.
"""

from __future__ import annotations

from ..probe import wire_unavailable_reason
from .forwarder import QUEUE_LIMIT
from .link import CLIENT_ADDR, SERVER_ADDR, Link, impaired
from .params import MAX_DELAY_MS

__all__ = ["impaired", "wire_unavailable_reason", "Link", "QUEUE_LIMIT", "MAX_DELAY_MS", "CLIENT_ADDR",
           "SERVER_ADDR"]
