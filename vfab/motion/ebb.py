"""EBB step-engine arithmetic: LM parameters and the firmware's exact LM times.

The EBB runs its step engine every 40 µs (25 kHz). For an LM axis the rate
starts at Rate − trunc(Accel / 2); each tick Rate += Accel, the accumulator
+= Rate, and a step is taken when the accumulator reaches 2^31 (which is then
subtracted). The axis stops after |Steps| steps and the command ends when both
axes have stopped. So after k ticks the accumulator has received
    C(k) = k·(Rate − trunc(Accel/2)) + Accel·k·(k+1)/2
and the axis finishes at the first k with C(k) >= |Steps|·2^31.

Rates are always given positive and Steps carries the direction, which both
firmware 2.7 and 3.x accept. The planner picks Accel so that each axis
reaches its step count by the planned tick while its rate is still positive,
so a decelerating axis can never stall or (3.x) turn around.

Times here assume the accumulators start at zero, so every LM is sent with
Clear = 3 (2.7.0 and later): otherwise the firmware carries each axis's
remainder into the next LM and a move can end up to a tick early, and on 3.x
a reversing axis can step up to one step period early.
"""

from __future__ import annotations

import numpy as np

TICKS_PER_S = 25_000
ACCUMULATOR_STEP = 1 << 31
MAX_RATE = (1 << 31) - 1


def _half_toward_zero(value: np.ndarray) -> np.ndarray:
    """value / 2 truncated toward zero, as the firmware's C division does."""
    return np.where(value < 0, -((-value) // 2), value // 2)


def accumulated(rate: np.ndarray, accel: np.ndarray, ticks: np.ndarray) -> np.ndarray:
    """C(k): what the accumulator has received after `ticks` ticks (int64, exact)."""
    return ticks * (rate - _half_toward_zero(accel)) + accel * (ticks * (ticks + 1) // 2)


def lm_axis_ticks(rate: np.ndarray, steps: np.ndarray, accel: np.ndarray) -> np.ndarray:
    """Ticks until an LM axis has taken |steps| steps (0 for an axis that does not move)."""
    rate = np.asarray(rate, dtype=np.int64)
    accel = np.asarray(accel, dtype=np.int64)
    count = np.abs(np.asarray(steps, dtype=np.int64))
    moving = count > 0
    target = count * ACCUMULATOR_STEP
    # Estimate from the quadratic, in its numerically stable form, then
    # settle the exact first tick with integer arithmetic.
    linear = (rate - _half_toward_zero(accel)).astype(np.float64) + accel / 2.0
    discriminant = np.maximum(linear * linear + 2.0 * accel * target.astype(np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = 2.0 * target / (linear + np.sqrt(discriminant))
    estimate = np.where(moving & np.isfinite(estimate), estimate, 1.0)
    ticks = np.maximum(np.ceil(estimate).astype(np.int64), 1)
    for _ in range(64):
        short = moving & (accumulated(rate, accel, ticks) < target)
        if not short.any():
            break
        ticks += short
    for _ in range(64):
        early = moving & (ticks > 1) & (accumulated(rate, accel, ticks - 1) >= target)
        if not early.any():
            break
        ticks -= early
    # At most one step per tick.
    ticks = np.maximum(ticks, count)
    return np.where(moving, ticks, 0)


def lm_ticks(rate1, steps1, accel1, rate2, steps2, accel2) -> np.ndarray:
    """Ticks an LM command takes: until both axes are done."""
    return np.maximum(lm_axis_ticks(rate1, steps1, accel1), lm_axis_ticks(rate2, steps2, accel2))


def lm_axis_parameters(steps: np.ndarray, ticks: np.ndarray,
                       start_fraction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Rate, Accel) for an axis to take |steps| steps in `ticks` ticks, speeding linearly.

    `start_fraction` is the starting rate as a fraction of the average rate
    (0 from rest, 1 constant speed, 2 to rest). Accel is the smallest value
    that completes the steps by the last tick, so the axis finishes on time
    with its rate still positive.
    """
    count = np.abs(np.asarray(steps, dtype=np.int64))
    ticks = np.asarray(ticks, dtype=np.int64)
    moving = count > 0
    target = count * ACCUMULATOR_STEP
    average = target.astype(np.float64) / ticks
    rate = np.clip(np.rint(average * start_fraction), 0, MAX_RATE).astype(np.int64)
    accel = np.ceil(2.0 * (target - ticks * rate).astype(np.float64)
                    / (ticks.astype(np.float64) ** 2)).astype(np.int64)
    for _ in range(64):
        short = moving & (accumulated(rate, accel, ticks) < target)
        if not short.any():
            break
        accel += short
    for _ in range(64):
        spare = moving & (accumulated(rate, accel - 1, ticks) >= target)
        if not spare.any():
            break
        accel -= spare
    return np.where(moving, rate, 0), np.where(moving, accel, 0)
