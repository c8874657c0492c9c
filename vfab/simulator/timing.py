"""How long EBB moves take, computed from the command parameters as the firmware runs them.

The firmware's step engine runs an interrupt every 40 us (25 kHz). For LM, per
axis: the rate starts at Rate - Accel/2 (truncated), and every tick Rate +=
Accel, the accumulator += Rate, and a step is taken when the accumulator
reaches 2^31 (which is then subtracted). So after T ticks the accumulator
holds C(T) = C0 + T*r0 + Accel*T*(T+1)/2, and the axis has taken
floor(C(T) / 2^31) steps. We find the tick of the last step by an exact
integer search on that closed form, never by looping over ticks.
"""

from __future__ import annotations

import math

import attr

TICK_SECONDS = 40e-6
ACCUMULATOR_STEP = 1 << 31
#: SM/XM step-rate limits (steps per second) from the command reference.
MAX_STEP_RATE = 25000.0
MIN_STEP_RATE = 1.31
#: HM waits about this long before its motion begins.
HM_START_DELAY = 0.005


def _trunc_half(value: int) -> int:
    """value / 2 truncated toward zero, as the firmware's C integer division."""
    return -((-value) // 2) if value < 0 else value // 2


@attr.s(frozen=True, auto_attribs=True)
class LowLevelAxis:
    """One axis of an LM/LT move: the accumulator model in closed form."""

    rate: int
    accel: int
    accumulator: int = 0

    @property
    def r0(self) -> int:
        return self.rate - _trunc_half(self.accel)

    def accumulated(self, ticks: int) -> int:
        """C(T): the accumulator after `ticks` ticks, before any steps are subtracted."""
        return self.accumulator + ticks * self.r0 + self.accel * ticks * (ticks + 1) // 2

    def last_rising_tick(self) -> int | None:
        """The last tick at which the rate is still >= 0 (None: it never falls)."""
        if self.accel >= 0:
            return None
        # r0 + k * accel >= 0  <=>  k <= r0 / -accel
        return self.r0 // -self.accel if self.r0 >= 0 else 0

    def steps_after(self, ticks: int) -> int:
        """Steps taken after `ticks` ticks (no step limit applied)."""
        if ticks <= 0:
            return 0
        peak = self.last_rising_tick()
        if peak is not None and ticks > peak:
            # Past the peak the firmware rolls the negative rate over (+2^31):
            # it then steps about once a tick. Hosts never plan this.
            return self.accumulated(peak) // ACCUMULATOR_STEP + (ticks - peak)
        return min(ticks, self.accumulated(ticks) // ACCUMULATOR_STEP)

    def ticks_for(self, steps: int) -> tuple[int, bool]:
        """(ticks until the `steps`-th step, whether the rate rolled over on the way)."""
        if steps <= 0 or (self.rate == 0 and self.accel == 0):
            return 0, False
        target = steps * ACCUMULATOR_STEP
        peak = self.last_rising_tick()
        if peak is not None:
            if peak < 1 or self.accumulated(peak) < target:
                done = self.accumulated(peak) // ACCUMULATOR_STEP if peak >= 1 else 0
                return max(peak, 0) + (steps - done), True
            high = peak
        else:
            high = max(1, steps)
            while self.accumulated(high) < target:
                high *= 2
        low = 1
        while low < high:  # smallest T with C(T) >= target; C rises on [1, high]
            middle = (low + high) // 2
            if self.accumulated(middle) >= target:
                high = middle
            else:
                low = middle + 1
        return max(low, steps), False  # at most one step per tick


@attr.s(frozen=True, auto_attribs=True)
class MoveTiming:
    """Duration of a move and when each axis finishes (seconds, at real speed)."""

    seconds: float
    axis_seconds: tuple[float, float]
    rolled_over: bool = False


def lm_timing(rate1: int, steps1: int, accel1: int, rate2: int, steps2: int, accel2: int,
              accumulators: tuple[int, int] = (0, 0)) -> tuple[MoveTiming, tuple[int, int]]:
    """Timing of `LM,...`, and the accumulators it leaves behind."""
    ticks = []
    rolled = False
    remainders = list(accumulators)
    for index, (rate, steps, accel) in enumerate(((rate1, steps1, accel1),
                                                  (rate2, steps2, accel2))):
        axis = LowLevelAxis(rate, accel, accumulators[index])
        count, rolled_axis = axis.ticks_for(abs(steps))
        ticks.append(count)
        rolled = rolled or rolled_axis
        if count and not rolled_axis:
            remainders[index] = axis.accumulated(count) - abs(steps) * ACCUMULATOR_STEP
    seconds = tuple(count * TICK_SECONDS for count in ticks)
    return MoveTiming(max(seconds), seconds, rolled), (remainders[0], remainders[1])


def lm_steps_at(rate: int, steps: int, accel: int, accumulator: int, elapsed: float) -> int:
    """Signed steps an LM axis has taken `elapsed` seconds into the move."""
    if steps == 0:
        return 0
    ticks = int(math.floor(elapsed / TICK_SECONDS + 1e-9))
    done = min(abs(steps), LowLevelAxis(rate, accel, accumulator).steps_after(ticks))
    return done if steps > 0 else -done


def lt_steps(intervals: int, rate: int, accel: int, accumulator: int = 0) -> int:
    """Signed steps an LT axis takes in `intervals` ticks (the sign of Rate is the direction)."""
    done = LowLevelAxis(abs(rate), accel, accumulator).steps_after(intervals)
    return done if rate >= 0 else -done


def sm_rate_problem(duration_ms: int, steps1: int, steps2: int) -> str | None:
    """The firmware's complaint about an SM/XM step rate, or None if both axes are in range."""
    seconds = duration_ms / 1000.0
    for name, steps in (("axis1", steps1), ("axis2", steps2)):
        if steps == 0:
            continue
        rate = abs(steps) / seconds
        if rate > MAX_STEP_RATE:
            return f"<{name}> step rate > 25K steps/second"
        if rate < MIN_STEP_RATE:
            return f"<{name}> step rate < 1.31Hz"
    return None


def hm_seconds(step_frequency: int, delta1: int, delta2: int) -> float:
    """HM: the longer axis moves at `step_frequency` steps per second, after a short delay."""
    return HM_START_DELAY + max(abs(delta1), abs(delta2)) / float(step_frequency)
