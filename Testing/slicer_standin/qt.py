"""Stand-in for ``qt`` (PythonQt): only QTimer.singleShot, which the Widget polls its background job with.

Nothing runs by itself: ``QTimer.pending`` collects the callbacks and a test calls them (``run_timers``),
which is what Qt's event loop would do after each delay.
"""

from __future__ import annotations


class QTimer:
    pending: list = []  # (msec, callback) in the order they were asked for  # noqa: RUF012

    @staticmethod
    def singleShot(msec: int, callback) -> None:
        QTimer.pending.append((int(msec), callback))


def run_timers(limit: int = 100000, sleep_s: float = 0.05) -> int:
    """Test helper (not Qt API): call pending timer callbacks, sleeping between them, until none is left."""
    import time

    calls = 0
    while QTimer.pending and calls < limit:
        _, callback = QTimer.pending.pop(0)
        time.sleep(sleep_s)
        callback()
        calls += 1
    return calls
