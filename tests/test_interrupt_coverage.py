"""Every loop inside a try (or a with) is covered by its handler, on the interpreter running the tests.

CPython 3.13.0 leaves the backward jump at the bottom of a ``while <condition>:`` loop out of the
exception table (`dis` shows it between two entries).  A signal handler's KeyboardInterrupt is raised
at that jump (the eval breaker is checked there), so it skipped the ``except``/``finally``/``with``
around the loop: connect_many left its epoll descriptor and every socket in flight open (the 3.13 leg
of .ci/run, test_hardening's interrupt test, about one run in 300).  ``while True:`` with an ``if not
<condition>: break`` is covered on every version, so nbconn writes its loops inside cleanup that way.

This test reads the bytecode the running interpreter compiles from nbconn's sources (no import, so the
optional extras need not be installed) and names every backward jump that an interrupt would take past
its handler.  The offset CPython looks up is the jump's own from 3.13, the instruction before it in 3.11
and 3.12 (python/cpython#108214).
"""

import ast
import dis
import pathlib
import sys
import types

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "nbconn"

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="before 3.11 there is no exception table")


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _handler(entries, offset: int):
    """The handler an exception raised at ``offset`` goes to (the innermost entry), or None."""
    for entry in entries:
        if entry.start <= offset < entry.end:
            return entry.target
    return None


def jumps_past_their_handler(code: types.CodeType) -> list[tuple[str, int]]:
    """(function, line) of every backward jump whose interrupt would not reach the handler of its loop."""
    found = []
    for co in _codes(code):
        bytecode = dis.Bytecode(co)
        entries = bytecode.exception_entries
        instructions = list(bytecode)
        # a generator's own handler only turns a StopIteration into RuntimeError: nothing to clean up there
        wrappers = {ins.offset for ins in instructions if ins.opname == "CALL_INTRINSIC_1"
                    and ins.argrepr == "INTRINSIC_STOPITERATION_ERROR"}
        entries = [e for e in entries if e.target not in wrappers]
        for i, ins in enumerate(instructions):
            if ins.opname != "JUMP_BACKWARD" or i == 0:
                continue
            looked_up = ins.offset if sys.version_info >= (3, 13) else instructions[i - 1].offset
            loop_handler = _handler(entries, ins.argval)  # where an interrupt at the loop's top goes
            if loop_handler is not None and _handler(entries, looked_up) is None:
                found.append((co.co_qualname, ins.positions.lineno or ins.starts_line or 0))
    return found


def _cleanup_lines(tree: ast.AST) -> set[int]:
    """Lines inside a with, a try with a finally, or a try whose handler catches KeyboardInterrupt."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            body = node.body
        elif isinstance(node, ast.Try) and (node.finalbody or any(_catches_interrupts(h) for h in node.handlers)):
            body = node.body
        else:
            continue
        for stmt in body:
            lines.update(range(stmt.lineno, stmt.end_lineno + 1))
    return lines


def _catches_interrupts(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(n is None or (isinstance(n, ast.Name) and n.id in ("BaseException", "KeyboardInterrupt"))
               for n in names)


def _sources():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_the_scan_finds_the_pattern_it_is_for():
    """A known case, so that an empty answer below means something."""
    src = ("def f(cleanup):\n"
           "    n = 0\n"
           "    try:\n"
           "        while n < 10:\n"
           "            n += 1\n"
           "    finally:\n"
           "        cleanup()\n")
    found = jumps_past_their_handler(compile(src, "<case>", "exec"))
    fixed = src.replace("while n < 10:\n", "while True:\n            if not n < 10:\n                break\n")
    assert jumps_past_their_handler(compile(fixed, "<fixed>", "exec")) == []
    if sys.version_info[:3] == (3, 13, 0):
        assert found == [("f", 4)]


def test_no_loop_in_nbconn_lets_an_interrupt_past_its_cleanup():
    found = []
    for path in _sources():
        source = path.read_text()
        cleanup = _cleanup_lines(ast.parse(source))
        found += [f"{path.relative_to(PACKAGE.parent)}:{line} in {name}"
                  for name, line in jumps_past_their_handler(compile(source, str(path), "exec")) if line in cleanup]
    assert not found, ("a Ctrl-C at the bottom of these loops skips their except/finally/with on Python "
                       f"{sys.version.split()[0]} (write `while True:` + `if not ...: break`):\n  " + "\n  ".join(found))
