"""How to connect, as one value: :class:`Settings`, validated once in its constructor and passed down.

nginx reads its configuration once, when it starts: ``proxy_connect_timeout``, ``proxy_bind``,
``proxy_socket_keepalive`` land in an ``ngx_http_upstream_conf_t`` that every connect then reads
and nobody re-checks.  :class:`Settings` is nbconn's counterpart, like :class:`ssl.SSLContext` or
urllib3's ``Timeout``: every entry point (``nbconn.connect``, ``connect_many``, ``measure.run``,
``eyeballs.happy_eyeballs``/``sequential``, ``tls.connect_tls``, the widget panel, the CLI) takes one,
or builds one from its keywords with :func:`given`; everything below it trusts it.  Only what needs
the target's family (a ``bind`` address of the other family, ``nodelay`` on an AF_UNIX path) is left
to :func:`nbconn.flow.make_plan`, which compiles a Settings into one ``Plan`` per family.

Why a value and not keywords: the same checks ran up to three times on the way down
(``measure.run`` -> ``api`` -> ``flow.make_plan``), and each entry point had its own list of
keywords, so one that forgot a keyword (``nginx_exact``) passed it on as an "unknown socket option".

This module imports only :mod:`nbconn.validate` and :mod:`nbconn.options`.
"""

from __future__ import annotations

from types import MappingProxyType

from . import validate
from .options import OPTIONS, check_options, parse_bind

#: The settings of the flow itself (not socket options), with their defaults, in the order repr shows them.
FLOW_DEFAULTS = {"timeout": 5.0, "nonblocking": "ioctl", "trigger": "edge", "keep": False, "trace": True,
                 "tcp_info": True, "nginx_exact": False}


def check_timeout(timeout: object) -> float:
    """The connect timer in seconds: a number > 0 and at most a day (ValueError/TypeError naming it)."""
    return validate.number("timeout", timeout, 0, validate.MAX_TIMEOUT_S, low_open=True)


class Settings:
    """How to connect: the connect timer, the flow's choices and the socket options, checked once.

    ``Settings(timeout=1.0, rcvbuf=4096, bind="127.0.0.2")``.  Keywords (all optional):

    * ``timeout``: the connect timer in seconds (nginx: proxy_connect_timeout), > 0 and at most a day;
    * ``nonblocking``: "ioctl" (FIONBIO, nginx's way), "fcntl" (O_NONBLOCK) or "setblocking";
    * ``trigger``: "edge" (EPOLLET, nginx's way) or "level";
    * ``keep``: keep a connected socket in ``result.sock``;
    * ``trace``: record every step with its duration; ``tcp_info``: read TCP_INFO after the decision;
    * ``nginx_exact``: exactly nginx's syscalls (needs nonblocking="ioctl", trigger="edge");
    * every socket option of :data:`nbconn.options.OPTIONS` (``rcvbuf=``, ``keepalive=``, ...; None or
      absent = the kernel's default) and ``bind="HOST[:PORT]"`` or ``(host, port)`` (nginx: proxy_bind).

    A bad value raises TypeError (wrong type) or ValueError (out of range), naming it, here -- before any
    socket exists.  The value is immutable: :meth:`replace` makes a changed copy.
    """

    __slots__ = ("timeout", "nonblocking", "trigger", "keep", "trace", "tcp_info", "nginx_exact", "options",
                 "bind", "local")

    def __init__(self, *, timeout: float = 5.0, nonblocking: str = "ioctl", trigger: str = "edge",
                 keep: bool = False, trace: bool = True, tcp_info: bool = True, nginx_exact: bool = False,
                 bind=None, **options) -> None:
        timeout = check_timeout(timeout)
        validate.choice("nonblocking", nonblocking, validate.NONBLOCKING_METHODS)
        validate.choice("trigger", trigger, validate.TRIGGERS)
        if validate.flag("nginx_exact", nginx_exact) and (nonblocking, trigger) != ("ioctl", "edge"):
            raise ValueError(f"nginx_exact=True makes nginx's calls: nonblocking='ioctl', trigger='edge' "
                             f"(got nonblocking={validate.shown(nonblocking)}, trigger={validate.shown(trigger)})")
        for name, value in (("keep", keep), ("trace", trace), ("tcp_info", tcp_info)):
            validate.flag(name, value)
        unknown = [name for name in options if name not in OPTIONS]
        if unknown:
            raise TypeError(f"unknown setting {validate.shown(unknown[0])} (settings: {', '.join(FLOW_DEFAULTS)}; "
                            f"socket options: {', '.join(OPTIONS)}, bind)")
        planned = check_options(options)  # types and ranges; what needs the family: make_plan
        local = None if bind is None else parse_bind(bind, None)  # its syntax; whether it fits the target: make_plan
        set_ = object.__setattr__
        set_(self, "timeout", timeout)
        set_(self, "nonblocking", nonblocking)
        set_(self, "trigger", trigger)
        set_(self, "keep", keep)
        set_(self, "trace", trace)
        set_(self, "tcp_info", tcp_info)
        set_(self, "nginx_exact", nginx_exact)
        #: the socket options set (name -> value as validated), in the order the flow applies them
        set_(self, "options", MappingProxyType({spec.name: value for spec, value in planned}))
        #: proxy_bind as given ("127.0.0.2", "[::1]:0", (host, port)) or None
        set_(self, "bind", bind)
        #: the parsed bind address (a nbconn.options.Bind) or None
        set_(self, "local", local)

    def __setattr__(self, name, value):
        raise AttributeError(f"Settings are immutable: use settings.replace({name}=...) for a changed copy")

    def __delattr__(self, name):
        raise AttributeError(f"Settings are immutable: {name} cannot be deleted")

    # -- as keywords -------------------------------------------------------------------------
    def keywords(self) -> dict:
        """Every setting as the keywords that build this Settings again (``Settings(**s.keywords()) == s``)."""
        out = {name: getattr(self, name) for name in FLOW_DEFAULTS}
        out.update(self.options)
        if self.bind is not None:
            out["bind"] = self.bind
        return out

    def to_dict(self) -> dict:
        """What a Measurement keeps as its ``settings``: timer, the two choices, the options set, and
        ``nginx_exact`` only when on (keep, trace, tcp_info change what is recorded, not what is measured)."""
        out = {"timeout": self.timeout, "nonblocking": self.nonblocking, "trigger": self.trigger,
               **self.options}
        if self.bind is not None:
            out["bind"] = self.bind
        if self.nginx_exact:
            out["nginx_exact"] = True
        return out

    def requested(self) -> dict:
        """The socket options and bind address asked for (a Result's ``requested``)."""
        out = dict(self.options)
        if self.bind is not None:
            out["bind"] = self.bind
        return out

    def replace(self, **changes) -> "Settings":
        """A copy with ``changes`` applied, validated like any new Settings (``None`` unsets an option)."""
        return Settings(**{**self.keywords(), **changes})

    # -- a value -----------------------------------------------------------------------------
    def __repr__(self) -> str:
        # only what differs from the defaults: Settings(timeout=1.0, rcvbuf=4096)
        parts = [f"{name}={getattr(self, name)!r}" for name, default in FLOW_DEFAULTS.items()
                 if getattr(self, name) != default]
        parts += [f"{name}={value!r}" for name, value in self.options.items()]
        if self.bind is not None:
            parts.append(f"bind={self.bind!r}")
        return f"Settings({', '.join(parts)})"

    def _key(self) -> tuple:
        return (*(getattr(self, name) for name in FLOW_DEFAULTS), tuple(self.options.items()),
                None if self.local is None else self.local.text)

    def __eq__(self, other) -> bool:
        return self._key() == other._key() if isinstance(other, Settings) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it through the constructor
        return (_rebuild, (self.keywords(),))


def _rebuild(keywords: dict) -> Settings:
    return Settings(**keywords)


def given(settings: Settings | None, keywords: dict, caller: str, **defaults) -> Settings:
    """An entry point's Settings: the one passed in, or one built from its keywords -- not both.

    ``defaults`` are the entry point's own defaults (``measure.run``'s timer is 1 s), applied to keywords only.
    """
    if settings is None:
        return Settings(**{**defaults, **keywords})
    if not isinstance(settings, Settings):
        raise TypeError(f"{caller}: settings must be a nbconn.Settings, got {validate.shown(settings)}")
    if keywords:
        raise TypeError(f"{caller}: pass a Settings or keywords ({', '.join(keywords)}), not both "
                        f"(settings.replace({next(iter(keywords))}=...) makes a changed copy)")
    return settings


# Keep the table honest: a socket option must not shadow a setting of the flow.
assert not set(OPTIONS) & {*FLOW_DEFAULTS, "bind"}
