"""The data mixture schedule: how many rows of each data type every step trains, so that every type trains at its
Table 1 share on any mesh.

A step's rows are dealt in units of `unit_rows` rows: the smallest block that splits evenly over the data-parallel
shards, the hosts, the reading streams and the micro-batches (`Plan` derives it). A global batch of B rows is U = B /
unit_rows units. Fixed sub-batches round each type's share of U to whole units, which on a pod erases small shares:
stage 2's 512 rows on 256 data shards are U = 2 units, and 14:80:6 rounds to 0:2:0. Here every step is dealt
its U units by the running totals instead:

    each type i gets its whole units ⌊U·p_i⌋ (p_i = r_i / R, the share), and the L leftover units of the step go to
    the L types furthest behind their share (largest deficit + fractional share; ties to the earlier type).

The deficit of every type then stays below one unit at every step boundary (for up to three types this is the
one-unit-at-a-time deficit deal on the fractional shares; `_step_deal` checks it over the whole period and deals
single units where it would not hold), and after P = R / gcd(R, U) steps every type has had exactly its share (R =
the ratio's smallest integer sum: 50 for 14:80:6 = 7:40:3, 10 for 30:50:20): the deal repeats, so the counts
after any step are a closed form (`PhaseSchedule.units_after`) and the run needs no state beyond its step. A phase
has at most three distinct compositions for three types (each type gets ⌊U·p_i⌋ or one unit more), each compiled
once. When every U·p_i is a whole number, every step has the same composition: the fixed sub-batches, unchanged.

Every step's loss averages each term over the rows it has this step but weighs it by (rows this step) / (the phase's
expected rows per step, B·p): the expected update of a step is then the fixed-share update of the paper, whatever the
composition (`term_scales`); with an exact composition the factor is 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np

MAX_PERIOD = 1_000_000  # units in one period of the deal (the ratio's integer sum): finer ratios are refused


def integer_ratio(ratio: Sequence[float]) -> tuple[int, ...]:
    """The smallest integers in the proportion of `ratio` (14:80:6 -> (7, 40, 3); 0.3:0.5:0.2 -> (3, 5, 2))."""
    if not ratio or any(r < 0 for r in ratio) or sum(ratio) <= 0:
        raise ValueError(f"a mixture ratio must be non-negative numbers with a positive sum, got {tuple(ratio)}")
    fractions = [Fraction(str(r)).limit_denominator(10_000) for r in ratio]
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    divisor = math.gcd(*ints)
    ints = tuple(i // divisor for i in ints)
    if sum(ints) > MAX_PERIOD:
        raise ValueError(f"the mixture ratio {tuple(ratio)} is too fine ({sum(ints)} units per period; use round "
                         f"numbers such as percentages)")
    return ints


@functools.lru_cache(maxsize=64)
def _unit_deal(shares: tuple[int, ...]) -> np.ndarray:
    """[R + 1, k] int64: units of each type after t = 0 ... R units dealt one at a time to the largest deficit
    (row R equals `shares`)."""
    total, k = sum(shares), len(shares)
    counts = np.zeros((total + 1, k), np.int64)
    got = [0] * k
    for t in range(1, total + 1):
        # deficit · R = t·r_i − R·A_i, in integers; the largest wins, ties to the earlier type
        best = max(range(k), key=lambda i: (t * shares[i] - total * got[i], -i))
        got[best] += 1
        counts[t] = got
    return counts


@functools.lru_cache(maxsize=64)
def _step_deal(shares: tuple[int, ...], units_per_step: int) -> np.ndarray:
    """[P + 1, k] int64: units of each type after n = 0 ... P steps (P = the steps after which the deal repeats).

    Each step every type gets its whole units ⌊U·p_i⌋ and the L leftover units go to the L types whose deficit plus
    fractional share is largest (ties to the earlier type): at most C(k, L) compositions (3 for three types). For up
    to three types this is the one-unit deal on the fractional shares (L = 1, or its mirror image L = k − 1), so every
    type stays within one unit of its share; that is checked here for every step of the period, and where it would
    fail (four or more types) the schedule deals single units instead (`_unit_deal`, within one unit always)."""
    total, k, u = sum(shares), len(shares), units_per_step
    period = total // math.gcd(total, u)
    whole = [u * r // total for r in shares]
    frac = [u * r - total * w for r, w in zip(shares, whole)]  # fractional shares · R
    leftover = sum(frac) // total
    counts = np.zeros((period + 1, k), np.int64)
    deficit = [0] * k  # (target − units) · R
    ok = True
    for n in range(1, period + 1):
        extra = sorted(range(k), key=lambda i: (-(deficit[i] + frac[i]), i))[:leftover]
        for i in range(k):
            got = whole[i] + (i in extra)
            deficit[i] += u * shares[i] - total * got
            counts[n, i] = counts[n - 1, i] + got
        ok &= all(abs(d) < total for d in deficit)
    if ok and not any(deficit):
        return counts
    unit = _unit_deal(shares)
    steps = np.arange(period + 1) * u
    return (steps // total)[:, None] * np.asarray(shares, np.int64) + unit[steps % total]


@dataclasses.dataclass(frozen=True)
class PhaseSchedule:
    """The deal of one mixture phase: `types` in order, their integer `shares`, U = `units_per_step` units of
    `unit_rows` global rows each."""

    types: tuple[str, ...]
    shares: tuple[int, ...]
    units_per_step: int
    unit_rows: int

    @classmethod
    def from_ratio(cls, types: Sequence[str], ratio: Sequence[float], batch_size: int,
                   unit_rows: int) -> "PhaseSchedule":
        if len(ratio) != len(types):
            raise ValueError(f"a mixture ratio needs {len(types)} numbers ({', '.join(types)}), got {tuple(ratio)}")
        if unit_rows < 1 or batch_size % unit_rows:
            raise ValueError(f"batch size {batch_size} is not a multiple of {unit_rows} rows (data shards x hosts x "
                             f"reading streams x micro-batches)")
        return cls(tuple(types), integer_ratio(ratio), batch_size // unit_rows, unit_rows)

    @property
    def period(self) -> int:
        return sum(self.shares)

    @property
    def trained_types(self) -> tuple[str, ...]:
        """The types with a positive share: those the phase reads."""
        return tuple(t for t, share in zip(self.types, self.shares) if share)

    @property
    def batch_size(self) -> int:
        return self.units_per_step * self.unit_rows

    def units_after(self, steps: int) -> np.ndarray:
        """Units of each type the first `steps` steps of the phase trained, [k] int64."""
        table = _step_deal(self.shares, self.units_per_step)
        full, rest = divmod(steps, self.steps_per_period)
        return full * table[-1] + table[rest]

    def rows_after(self, steps: int) -> dict[str, int]:
        return {t: int(u) * self.unit_rows for t, u in zip(self.types, self.units_after(steps))}

    def expected_rows(self, steps: float = 1) -> dict[str, float]:
        """The rows each type's share asks for over `steps` steps (B·p_i per step)."""
        return {t: steps * self.batch_size * s / self.period for t, s in zip(self.types, self.shares)}

    def composition(self, step: int) -> tuple[int, ...]:
        """Global rows of each type (in `types` order) at step `step` of the phase (0-based)."""
        units = self.units_after(step + 1) - self.units_after(step)
        return tuple(int(u) * self.unit_rows for u in units)

    @property
    def steps_per_period(self) -> int:
        """The composition sequence repeats after this many steps."""
        return self.period // math.gcd(self.period, self.units_per_step)

    def compositions(self, steps: int | None = None) -> list[tuple[int, ...]]:
        """The distinct compositions of the phase's first `steps` steps (default: all), in order of first use."""
        n = self.steps_per_period if steps is None else min(steps, self.steps_per_period)
        return list(dict.fromkeys(self.composition(i) for i in range(n)))

    def first_step(self, type_index: int) -> int | None:
        """The first step of the phase that trains `types[type_index]` (None: a zero share)."""
        if not self.shares[type_index]:
            return None
        table = _step_deal(self.shares, self.units_per_step)[:, type_index]
        return int(np.argmax(table > 0)) - 1


def sizes_dict(types: Sequence[str], composition: Sequence[int]) -> dict[str, int]:
    """A composition as {type: rows}, zero-row types left out (they are absent from the batch)."""
    return {t: n for t, n in zip(types, composition) if n}


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The run's schedule over its mixture phases: ((start step, end step, PhaseSchedule), ...); the last phase
    also covers the steps past its end."""

    types: tuple[str, ...]
    phases: tuple[tuple[int, int, PhaseSchedule], ...]

    @classmethod
    def from_config(cls, types: Sequence[str], mixture, batch_size: int, unit_rows: int) -> "Mixture":
        """From a run config's `mixture` ((until_step, ratio), ...), `batch_size` and the unit."""
        phases, start = [], 0
        for until, ratio in mixture:
            phases.append((start, int(until), PhaseSchedule.from_ratio(types, ratio, batch_size, unit_rows)))
            start = int(until)
        return cls(tuple(types), tuple(phases))

    def phase_at(self, step: int) -> int:
        for i, (_, end, _) in enumerate(self.phases):
            if step < end:
                return i
        return len(self.phases) - 1

    def schedule(self, phase: int) -> PhaseSchedule:
        return self.phases[phase][2]

    def composition(self, step: int) -> tuple[int, ...]:
        """Global rows of each type (in `types` order) at run step `step`."""
        phase = self.phase_at(step)
        start, _, schedule = self.phases[phase]
        return schedule.composition(step - start)

    def sizes(self, step: int) -> dict[str, int]:
        return sizes_dict(self.types, self.composition(step))

    def _spans(self, steps: int):
        """(phase index, steps of it run) for the first `steps` steps of the run."""
        for i, (start, end, _) in enumerate(self.phases):
            last = i == len(self.phases) - 1
            run = max(0, min(steps, steps if last else end) - start)
            if run or i == 0:
                yield i, run

    def rows_after(self, steps: int) -> dict[str, int]:
        """Rows of each type the first `steps` steps of the run trained (the realised counts)."""
        total = dict.fromkeys(self.types, 0)
        for i, run in self._spans(steps):
            for t, n in self.phases[i][2].rows_after(run).items():
                total[t] += n
        return total

    def target_rows(self, steps: int) -> dict[str, float]:
        """Rows of each type the ratios ask for over the first `steps` steps."""
        total = dict.fromkeys(self.types, 0.0)
        for i, run in self._spans(steps):
            for t, n in self.phases[i][2].expected_rows(run).items():
                total[t] += n
        return total

    def compositions(self, steps: int) -> list[tuple[int, tuple[int, ...]]]:
        """(phase, composition) of every distinct step shape a run of `steps` steps uses, in order of first use."""
        out = []
        for i, run in self._spans(steps):
            out += [(i, c) for c in self.phases[i][2].compositions(run) if (i, c) not in out]
        return out

    def unschedulable(self, steps: int) -> list[str]:
        """'<type> in phase <i> (steps a-b)' for every type with a positive share that a run of `steps` steps never
        trains in a phase it runs (the phase ends before the type's first unit)."""
        problems = []
        for i, run in self._spans(steps):
            start, _, schedule = self.phases[i]
            if not run:
                continue
            for k, name in enumerate(self.types):
                first = schedule.first_step(k)
                if first is not None and first >= run:
                    problems.append(f"{name} (share {schedule.shares[k]}/{schedule.period}) in phase {i} "
                                    f"(steps {start}-{start + run - 1}): first trained at step {start + first}")
        return problems


def term_scales(term_types: Mapping[str, Sequence[str]], sizes: Mapping[str, int],
                expected: Mapping[str, float]) -> dict[str, float]:
    """Per loss term, (its rows in this composition) / (its expected rows per step), 1 for a term with no expected
    rows: the factor that makes the expected step update the fixed-share one (module docstring). `term_types` maps a
    term to the data types whose rows it averages over (JanusFlow's L_AR: understanding + text-only)."""
    out = {}
    for term, kinds in term_types.items():
        want = sum(expected.get(k, 0.0) for k in kinds)
        have = sum(sizes.get(k, 0) for k in kinds)
        out[term] = have / want if want else 1.0
    return out
