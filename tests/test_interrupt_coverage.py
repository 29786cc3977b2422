"""Every loop inside a try (or a with) is covered by its handler, on the interpreter running the tests.

A signal handler's KeyboardInterrupt is raised where the interpreter checks for pending work (its "eval
breaker"): at calls and at the jump back to a loop's top.  The exception table then decides, from one
offset, which except/finally/with gets it.  CPython 3.13 (3.13.0 here; 3.13.1 and 3.13.2 too,
python/cpython#130279) leaves the backward jump at the bottom of a ``while <condition>:`` loop, and the
one that ends an ``if`` at the end of a loop body, out of that table: an interrupt there skipped every
handler of the frame, and connect_many left its epoll descriptor and every socket in flight open (the
3.13 leg of .ci/run, test_hardening's interrupt test, about one run in 300).  3.11 and 3.12 check after
jumping and look up the code unit before the loop's top: when that top is the first instruction of the
try (a loop that opens the try body, reached again by ``continue``), the try is skipped there too
(python/cpython#108214 is one case: ``while 1: pass`` on one line).

Safe on every version: the loop in a function of its own, called from inside the try (the call is
covered; the loop's frame has no handler to skip), or ``while True:`` + ``if not <condition>: break``
that does not open the try body.  This test reads the bytecode the running interpreter compiles from
nbconn's sources (no import, so the optional extras need not be installed) and names every backward
jump that an interrupt would take past its handler.  The first tests check that reading against what
the interpreter does: they interrupt tight loops of each shape and see which handlers run.
"""

import ast
import dis
import pathlib
import signal
import sys
import textwrap
import types

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "nbconn"

pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="before 3.11 there is no exception table")

# The jumps that check for a pending signal on their way back to a loop's top (3.11 also has
# conditional ones; JUMP_BACKWARD_NO_INTERRUPT, in `await` and `yield from`, does not check).
_BACKWARD_JUMPS = {"JUMP_BACKWARD", "POP_JUMP_BACKWARD_IF_TRUE", "POP_JUMP_BACKWARD_IF_FALSE",
                   "POP_JUMP_BACKWARD_IF_NONE", "POP_JUMP_BACKWARD_IF_NOT_NONE"}


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


def _looked_up(jump: dis.Instruction) -> int:
    """The offset whose exception-table entry receives an interrupt raised at this backward jump."""
    if sys.version_info >= (3, 13):
        return jump.offset  # JUMP_BACKWARD checks before it jumps (Python/bytecodes.c)
    return jump.argval - 2  # it jumps, then checks; the unwinder takes the code unit before the one it is at


def _line(ins: dis.Instruction) -> int:
    return ins.positions.lineno or getattr(ins, "line_number", None) or 0


def jumps_past_their_handler(code: types.CodeType) -> list[tuple[str, int]]:
    """(function, line) of every backward jump whose interrupt would not reach the handler of its loop."""
    return [(co.co_qualname, _line(jump)) for co in _codes(code) for jump in _uncovered_jumps(co)]


def _uncovered_jumps(co: types.CodeType) -> list[dis.Instruction]:
    """The backward jumps of this one code object whose interrupt misses the handler they are inside of."""
    bytecode = dis.Bytecode(co)
    instructions = list(bytecode)
    # a generator's own handler only turns a StopIteration into RuntimeError: nothing to clean up there
    wrappers = {ins.offset for ins in instructions if ins.opname == "CALL_INTRINSIC_1"
                and ins.argrepr == "INTRINSIC_STOPITERATION_ERROR"}
    entries = [e for e in bytecode.exception_entries if e.target not in wrappers]
    found = []
    for ins in instructions:
        if ins.opname not in _BACKWARD_JUMPS:
            continue
        # the handler the jump is inside of; a jump left out of the table has its loop's (the loop's top)
        meant = _handler(entries, ins.offset) or _handler(entries, ins.argval)
        if meant is not None and not _reaches(entries, _handler(entries, _looked_up(ins)), meant):
            found.append(ins)
    return found


def _reaches(entries, handler, meant) -> bool:
    """Whether an exception sent to ``handler`` gets to ``meant``: there, or through the handlers that pass
    it on outward (an except clause that does not match re-raises to the entry covering its own code).
    (3.12's jump out of an except clause looks up that clause itself: it does not match, and re-raises.)"""
    seen = set()
    while handler is not None and handler not in seen:
        if handler == meant:
            return True
        seen.add(handler)
        handler = _handler(entries, handler)
    return False


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


# Loops of each shape, in a try whose finally records that it ran.  Their bodies call nothing, so the
# backward jump is the only place an interrupt can land while they run; each ends after LIMIT turns.
_SHAPES = {
    "while_condition": "while n < LIMIT:\n    n += 1",
    "while_true_break": "while True:\n    if not n < LIMIT:\n        break\n    n += 1",
    "for_if_at_the_end": "for i in range(LIMIT):\n    if i % 3:\n        n += 1",
    "for_if_return": "for i in range(LIMIT):\n    if i < 0:\n        return n",
    "while_true_if_return": "while True:\n    n += 1\n    if n > LIMIT:\n        return n",
    "while_condition_continue": "while n < LIMIT:\n    if n >= 0:\n        n += 1\n        continue\n    n -= 1",
    "while_true_continue": "while True:\n    if n < LIMIT:\n        n += 1\n        continue\n    break",
}


def _in_a_try(shape: str, limit: int) -> types.CodeType:
    loop = textwrap.indent(_SHAPES[shape], " " * 8)
    source = f"def f(ran, LIMIT={limit}):\n    n = 0\n    try:\n{loop}\n    finally:\n        ran.append(1)\n"
    return compile(source, shape, "exec")


class _Interrupt(BaseException):
    """Raised by the test's signal handler (a KeyboardInterrupt that escaped would stop pytest)."""


def _interrupt_the_loop(shape: str) -> tuple[int, bool]:
    """Interrupt the loop of ``shape`` at one of its backward jumps: (that jump's offset, whether the finally ran)."""
    namespace: dict = {}
    exec(_in_a_try(shape, 10**9), namespace)
    code = namespace["f"].__code__
    jumps = {ins.offset for ins in dis.get_instructions(code) if ins.opname in _BACKWARD_JUMPS}

    def interrupt(signum, frame):
        raise _Interrupt

    old = signal.signal(signal.SIGPROF, interrupt)
    try:
        for _ in range(20):  # again if the signal came before the loop (at the call, not at a jump)
            ran: list = []
            try:
                # ITIMER_PROF counts this process's CPU time: the loop spends it, so the signal comes in the loop
                signal.setitimer(signal.ITIMER_PROF, 0.002)
                namespace["f"](ran)
            except _Interrupt as exc:
                where = [tb.tb_lasti for tb in _entries(exc.__traceback__) if tb.tb_frame.f_code is code]
                if where and where[0] in jumps:
                    return where[0], bool(ran)
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
    finally:
        signal.signal(signal.SIGPROF, old)
    raise AssertionError(f"{shape}: no interrupt landed on a backward jump in 20 runs")


def _entries(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_the_scan_says_what_the_interpreter_does(shape):
    """For each jump an interrupt lands on, the scan's answer is what the interpreter does with it: a scan
    that named nothing because its rule was wrong for this version would fail here."""
    uncovered = {ins.offset for ins in _uncovered_jumps(_function(_in_a_try(shape, 10**9)))}
    for _ in range(4):  # a loop may have more than one backward jump; the signal lands on any of them
        jump, ran = _interrupt_the_loop(shape)
        assert (jump in uncovered) == (not ran), (shape, jump, uncovered)


def _function(module: types.CodeType) -> types.CodeType:
    return next(c for c in module.co_consts if isinstance(c, types.CodeType))


def test_the_scan_finds_the_pattern_it_is_for():
    """The shape this interpreter gets wrong is named; while True + break never is."""
    def named(shape):
        return jumps_past_their_handler(_in_a_try(shape, 10)) != []

    if sys.version_info[:2] == (3, 13):
        assert named("while_condition")  # if a 3.13 fixes it, this line goes
    elif sys.version_info[:2] in ((3, 11), (3, 12)):
        assert named("while_true_continue")
    assert not named("while_true_break")


def test_no_loop_in_nbconn_lets_an_interrupt_past_its_cleanup():
    found = []
    for path in _sources():
        source = path.read_text()
        cleanup = _cleanup_lines(ast.parse(source))
        found += [f"{path.relative_to(PACKAGE.parent)}:{line} in {name}"
                  for name, line in jumps_past_their_handler(compile(source, str(path), "exec")) if line in cleanup]
    assert not found, ("a Ctrl-C at the bottom of these loops skips their except/finally/with on Python "
                       f"{sys.version.split()[0]} (move the loop into a function called inside the try, or write "
                       "`while True:` + `if not ...: break`, see this test's docstring):\n  " + "\n  ".join(found))
