"""Find what a test left unclosed: sockets, transports, client sessions freed by the collector.

An object nobody closed is only noticed when it is freed, which for objects in reference cycles
can be many tests later; with ``filterwarnings = ["error"]`` its ResourceWarning then fails
whatever test is running, and nothing says where it came from. ``collect_leaks`` runs the
collector now and returns what it reported instead, so the test that leaked can be named.
"""

from __future__ import annotations

import gc
import sys
import tracemalloc
import warnings


def collect_leaks() -> list[str]:
    """Run the garbage collector; the ResourceWarnings and unraisable errors it produced.

    Warnings are recorded, never raised, so each finaliser runs to its end and closes what it
    frees. Errors raised inside finalisers go to ``sys.unraisablehook``, which is swapped for a
    recorder meanwhile, so none of them reaches pytest's hook and is blamed on a later test.
    """
    unraisable: list[str] = []

    def record(args: sys.UnraisableHookArgs) -> None:
        unraisable.append(
            f"  {args.err_msg or 'Exception ignored in'}: {args.object!r}: "
            f"{args.exc_type.__name__}: {args.exc_value}"
        )

    previous_hook = sys.unraisablehook
    sys.unraisablehook = record
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gc.collect()
            found = [_describe(w) for w in caught if issubclass(w.category, ResourceWarning)]
            caught.clear()  # the records hold the freed objects as their source
    finally:
        sys.unraisablehook = previous_hook
    return found + unraisable


def _describe(warning: warnings.WarningMessage) -> str:
    """The message, and where the object was allocated when tracemalloc traces
    (``PYTHONTRACEMALLOC=20 pytest ...``)."""
    text = f"  {warning.category.__name__}: {warning.message}"
    source = warning.source
    text += _peer(source)
    allocated = tracemalloc.get_object_traceback(source) if source is not None else None
    if allocated is not None:
        lines = allocated.format(limit=12, most_recent_first=True)
        text += "\n    allocated at:\n" + "\n".join("      " + line for line in lines)
    return text


def _peer(source: object) -> str:
    """Who a leaked transport or socket was talking to (a NATS port, the emulator's, ...):
    its socket is still open while the warning is made."""
    sock = getattr(source, "_sock", source)
    try:
        local, peer = sock.getsockname(), sock.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return ""
    return f" (local {local}, peer {peer})"
