"""The second paper's cubic pruning schedule (docs/finepruning.md §2): dense warm-up, cubic decay of the kept
fraction, a final stretch at the target.

T steps, w = int(warmup * T), t_i = w, t_f = 3w; keep fraction v(t) = 1 for t <= t_i, v_f for t > T - t_f,
else v_f + (1 - v_f) c^3 with c = 1 - (t - t_i) / (T - t_i - t_f); t counts finished optimizer steps from 0.
The learning rate (weights and scores alike) warms up linearly over w steps, then decays linearly
(train.loop.warmup_decay, the same schedule fine-tuning uses).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..train.loop import warmup_decay


@dataclass(frozen=True)
class CubicSchedule:
    """Keep fraction over training: dense warm-up, cubic decay, final stretch at `keep_final`."""

    total: int
    keep_final: float
    warmup: float = 0.1

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.total)

    @property
    def t_initial(self) -> int:
        return self.warmup_steps

    @property
    def t_final(self) -> int:
        return 3 * self.warmup_steps

    @staticmethod
    def min_steps(warmup: float) -> int:
        """Fewest steps with at least one warm-up step and a cubic stretch (t_i < T - t_f)."""
        t = 1
        while int(warmup * t) < 1 or 4 * int(warmup * t) >= t:
            t += 1
        return t

    def validate(self) -> None:
        if not 0 < self.warmup < 0.25:
            raise UserError(f"--warmup must be in (0, 0.25) so that warm-up, decay and final stretch fit, "
                            f"got {self.warmup}")
        if self.warmup_steps < 1 or self.t_initial >= self.total - self.t_final:
            n = self.min_steps(self.warmup)
            raise UserError(f"--steps {self.total} is below the pruning schedule's warm-up: with --warmup "
                            f"{self.warmup} it needs at least {n} steps (dense warm-up, cubic decay, 3x warm-up "
                            f"at the target)")

    def keep(self, t: int) -> float:
        """v(t), the fraction of neurons kept after t finished steps."""
        if t <= self.t_initial:
            return 1.0
        if t > self.total - self.t_final:
            return self.keep_final
        c = 1.0 - (t - self.t_initial) / (self.total - self.t_initial - self.t_final)
        return self.keep_final + (1.0 - self.keep_final) * c ** 3

    def lr_factor(self, t: int) -> float:
        return warmup_decay(self.total, self.warmup)(t)


