"""The nginx side: nbconn's model of nginx's upstream next to a real nginx 1.22.1, and what compares them.

- :mod:`~nbconn.nginx.upstream`: the model -- round robin, ``proxy_next_upstream``, ``max_fails``, the keepalive
  cache (pure state; the I/O that drives it is :func:`~nbconn.nginx.upstream.run_request`).
- :mod:`~nbconn.nginx.tls`: the upstream TLS handshake after the connect, on the same loop.
- :mod:`~nbconn.nginx.runner`: a private, real nginx (``Nginx``) and the readers of its logs and strace;
  :mod:`~nbconn.nginx.guard` is the small process that ends it with its caller.
- :mod:`~nbconn.nginx.httpd`: the HTTP/1.1 keep-alive peer both of them talk to.
- :mod:`~nbconn.nginx.oracle`: random configurations through the model and the real nginx, request by request.
- :mod:`~nbconn.nginx.why` (an error-log line -> its step) and :mod:`~nbconn.nginx.reproduce` (make it happen again).

Nothing is imported here: ``import nbconn.nginx.upstream`` loads the model without the runner's subprocesses.
"""
