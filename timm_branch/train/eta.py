"""How far a run has come and how long it still needs: the ETA of the per-epoch log line.

:class:`RunClock` counts training steps, the unit of a run's work (tasks may differ in size: a
``joint`` task trains on every task so far), and extrapolates the time per step measured so far,
evaluations included, to the steps left. It reads the host clock once per epoch, never inside
the step loop, so it adds no wait for the device.
"""
from __future__ import annotations

import time
from typing import Callable

__all__ = ["RunClock", "format_duration"]


def format_duration(seconds: float) -> str:
    """``seconds`` as ``"45 s"``, ``"12 min 5 s"`` or ``"2 h 03 min"`` (rounded to the second)."""
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


class RunClock:
    """The elapsed time of this process's share of a run and the estimate of the time left.

    Args:
        total_steps: the training steps this process still has to run when it starts (a resumed
            run counts only the steps left).
        clock: seconds from an arbitrary origin (``time.perf_counter``; a test passes its own).
    """

    def __init__(self, total_steps: int, clock: Callable[[], float] = time.perf_counter) -> None:
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        self.total_steps = total_steps
        self.done_steps = 0
        self._clock = clock
        self._start = clock()

    def skip(self, steps: int) -> None:
        """Take ``steps`` off the total: steps a resumed task had finished before the interruption."""
        self.total_steps = max(self.done_steps, self.total_steps - steps)

    def advance(self, steps: int) -> str:
        """Count ``steps`` more steps as done; returns ``"elapsed E, about L left"`` (or ``"elapsed
        E"`` once every step is done), L being the time per step so far times the steps left."""
        self.done_steps = min(self.total_steps, self.done_steps + steps)
        elapsed = self._clock() - self._start
        left = self.total_steps - self.done_steps
        if left == 0 or self.done_steps == 0:
            return f"elapsed {format_duration(elapsed)}"
        return f"elapsed {format_duration(elapsed)}, about {format_duration(elapsed / self.done_steps * left)} left"
