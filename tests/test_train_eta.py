"""The run's ETA (timm_branch.train.eta) on a hand-driven clock."""
from __future__ import annotations

import pytest

from timm_branch.train.eta import RunClock, format_duration


def test_format_duration():
    assert [format_duration(s) for s in (0, 44.6, 65, 3599.4, 7380)] == ["0 s", "45 s", "1 min 5 s", "59 min 59 s", "2 h 03 min"]


def test_the_time_per_step_so_far_extrapolates_to_the_steps_left():
    now = [100.0]
    clock = RunClock(40, clock=lambda: now[0])
    now[0] = 130.0
    assert clock.advance(10) == "elapsed 30 s, about 1 min 30 s left"  # 3 s a step, 30 steps left
    clock.skip(10)  # a resumed task's finished epochs: no time to spend on them
    now[0] = 160.0
    assert clock.advance(10) == "elapsed 1 min 0 s, about 30 s left"
    now[0] = 190.0
    assert clock.advance(10) == "elapsed 1 min 30 s"  # done: no estimate
    assert clock.done_steps == clock.total_steps == 30


def test_a_run_with_nothing_left_counts_no_steps():
    assert RunClock(0).advance(0) == "elapsed 0 s"
    with pytest.raises(ValueError, match="total_steps"):
        RunClock(-1)
