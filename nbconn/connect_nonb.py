"""The lesson in twenty lines: a non-blocking connect with nothing but the standard library.

Notebook 00 prints :func:`connect_nonb` in a cell, character for character (a test
compares the two), and maps each line to the nginx 1.22.1 line it mirrors.  The same
test runs it under strace and checks that it makes the same syscalls, in the same
order, as ``nbconn.connect(..., nginx_exact=True)`` -- and as an nginx worker does.

The name is a nod to ``connect_nonb`` in Stevens' UNIX Network Programming, 16.3,
which did the same with select(); this one uses epoll, as nginx does.  Only the
standard library is imported, so a strace of it shows the lesson and nothing else.

Its ``err == 0`` branch never runs here (a non-blocking TCP connect() on Linux returns
EINPROGRESS even on loopback).  Where connect() does return 0 (AF_UNIX), nginx 1.22.1
still reads SO_ERROR once before its first write: ``ngx_http_upstream_send_request``
runs ``ngx_http_upstream_test_connect`` whenever ``!u->request_sent`` (see nbconn.flow).
"""

import errno
import fcntl
import select
import socket
import struct
import termios
import time


def connect_nonb(host, port, timeout_s=5.0):
    ep = select.epoll()  # nginx makes its epoll once per worker (ngx_epoll_init)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # 1. socket()
    try:  # 2. options would go here (setsockopt), 3. non-blocking:
        fcntl.ioctl(s.fileno(), termios.FIONBIO, struct.pack("i", 1))
        ep.register(s.fileno(), select.EPOLLIN | select.EPOLLOUT  # 4. epoll,
                    | select.EPOLLRDHUP | select.EPOLLET)  # before connect()
        err = s.connect_ex((host, port))  # 5. connect()
        if err == 0:
            return "NGX_OK: connected at once"
        if err != errno.EINPROGRESS:
            return f"NGX_DECLINED: {errno.errorcode[err]}, try the next peer"
        deadline = time.monotonic() + timeout_s  # the connect timer
        events = ep.poll(max(0.0, deadline - time.monotonic()))
        if not events:  # the timer came first: close, SO_ERROR is never read
            return "NGX_HTTP_UPSTREAM_FT_TIMEOUT: upstream timed out"
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # read it once
        if err:
            return f"NGX_ERROR: {errno.errorcode[err]}, try the next peer"
        return "NGX_OK: connected, send the request"
    finally:
        s.close()  # close() also takes the descriptor out of epoll
        ep.close()
