"""The one rule for checking what a caller passed in, and the one list of each set of choices.

Every public entry point (``nbconn.connect``, ``measure.run``, ``lab.impaired``,
the upstream model, the CLI, the widgets) checks its arguments here, at the edge,
before any socket, namespace or process exists.  Deeper layers trust their inputs.

The rule:

* a value of the wrong *type* raises ``TypeError``; a value of the right type
  that is out of range or malformed raises ``ValueError``;
* the message names the parameter and shows the value, capped at
  :data:`MAX_SHOWN` characters (a 5000-digit port is not echoed whole);
* huge numbers are compared as they are, never converted first, so
  ``timeout=10**400`` is a ValueError, not an OverflowError;
* text from a command line is parsed with :func:`int_text` / :func:`float_text`:
  ASCII digits only (Python's ``int("٣")`` is 3, nginx would reject it).

This module imports nothing from nbconn.
"""

from __future__ import annotations

import math
import re

#: How many characters of a bad value an error message shows.
MAX_SHOWN = 40

# -- the choices: one home each ---------------------------------------------------

#: How step 3 makes the socket non-blocking: nginx's ioctl(FIONBIO), fcntl(O_NONBLOCK), or Python's setblocking.
NONBLOCKING_METHODS = ("ioctl", "fcntl", "setblocking")
#: Step 4's epoll registration: edge-triggered (EPOLLET, nginx) or level-triggered.
TRIGGERS = ("edge", "level")
#: The lab's scenarios, by the names the CLI, measure.run and the widgets use (nbconn.lab maps them to peers).
SCENARIOS = ("listening", "refused", "blackhole", "reset", "slow-accept", "unix-listening", "unix-full",
             "unix-missing", "impaired")
#: What `python -m nbconn capture` and nbconn.experiments.nb11.shoot can show: some of SCENARIOS, plus a SYN flood
#: answered with syncookies ("syncookie").
CAPTURE_SCENARIOS = ("listening", "refused", "blackhole", "impaired", "slow-accept", "syncookie")

# -- limits --------------------------------------------------------------------------

#: The longest connect timer accepted, in seconds (a day).
MAX_TIMEOUT_S = 24 * 3600.0
#: Most connects one call runs, and most in flight at once.
MAX_COUNT = 1_000_000
MAX_CONCURRENCY = 100_000


def shown(value: object) -> str:
    """``repr(value)``, cut to :data:`MAX_SHOWN` characters with a note of how long it was."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** (MAX_SHOWN - 1):
        # repr() of a very large int is slow and (since 3.11) may refuse: say how big it is instead.
        return f"<an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits>"
    try:
        text = repr(value)
    except ValueError:  # e.g. a tuple holding an integer too long to print (sys.get_int_max_str_digits)
        return f"<a {type(value).__name__} too large to show>"
    except Exception as exc:  # a caller's object whose __repr__ raises (or returns a non-str): still named
        return f"<a {type(value).__name__} whose repr() raised {type(exc).__name__}>"
    if len(text) > MAX_SHOWN:
        return f"{text[:MAX_SHOWN - 3]}... ({len(text)} characters)"
    return text


def integer(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``low..high`` (either bound may be None); bools are not ints here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number, got {shown(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={shown(value)} is outside {_range_text(low, high)}")
    return int(value)


def number(name: str, value: object, low: float | None = None, high: float | None = None, *,
           low_open: bool = False) -> float:
    """``value`` (int or float, finite) within ``low..high``; ``low_open`` excludes ``low`` itself."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name}={shown(value)} must be a finite number")
    # Compare before converting: float(10**400) would raise OverflowError.
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        if low_open:
            raise ValueError(f"{name}={shown(value)} must be > {low}" + (f" and at most {high}" if high is not None else ""))
        raise ValueError(f"{name}={shown(value)} is outside {_range_text(low, high)}")
    return float(value)


def choice(name: str, value: object, choices) -> str:
    """``value`` if it is one of ``choices`` (compared as given; no case folding)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={shown(value)} must be one of {', '.join(choices)}")
    return value


def flag(name: str, value: object) -> bool:
    """A yes/no setting: a real bool (1 and "yes" are refused: they hide typos)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {shown(value)}")
    return value


_ASCII_INT = re.compile(r"[+-]?[0-9]{1,30}")
_ASCII_FLOAT = re.compile(r"[+-]?([0-9]{1,30}(\.[0-9]{0,30})?|\.[0-9]{1,30})([eE][+-]?[0-9]{1,3})?")


def int_text(name: str, text: str) -> int:
    """A whole number typed as text (a CLI flag, a widget box): ASCII digits, at most 30 of them."""
    if not isinstance(text, str) or _ASCII_INT.fullmatch(text.strip()) is None:
        raise ValueError(f"{name} {shown(text)} is not a whole number")
    return int(text.strip(), 10)


def float_text(name: str, text: str) -> float:
    """A number typed as text: ASCII digits, a point, an exponent; no inf, nan or underscores."""
    if not isinstance(text, str) or _ASCII_FLOAT.fullmatch(text.strip()) is None:
        raise ValueError(f"{name} {shown(text)} is not a number")
    return float(text.strip())


def _range_text(low: object, high: object) -> str:
    if low is None:
        return f"..{high}"
    if high is None:
        return f"{low}.."
    return f"{low}..{high}"
