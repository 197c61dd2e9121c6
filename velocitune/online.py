"""Online targets: each domain's law refitted from the main run's own points (docs/design.md §3, "Online targets").

`OnlineTargets` keeps the run's validation points at every update and, from them and the `targets` proxy's
prediction (the prior), one `laws.online_law.OnlineLaw` per domain. From those laws it gives the rule

- the **mixture-aware target** of each domain: its predicted loss at the end of the run if it keeps the
  share it is sampled at now (the allocation the rule is choosing), not the static mixture's;
- the **static prediction**: its predicted loss at the end under w0 from the start, what `max_rise` compares to;
- the **floors**: the smallest share that keeps each domain within `max_rise` of its static prediction
  (the rule never goes below them), and the **forgetting** domains, those whose own data is not predicted to
  lower their loss: their velocity is 0 and their floor is their corpus share w0 (they keep static's data,
  no less and no more, so a small replay slice cannot pull the rule's weight).

Everything is a pure function of the points and the sampler's schedule, so its state is the points alone
(plain JSON) and `--resume` refits the same laws bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from velocitune.errors import CheckpointError
from velocitune.laws.cpt_law import lr_areas
from velocitune.laws.online_law import OnlineLaw, fit_online_law, own_area

# The run's own points a refit needs; before that the laws pass through ℓ_init and the prior alone.
MIN_POINTS = 3


class OnlineTargets:
    """The online laws of one run.

    names: the domains. init: ℓ_init (k,). prior: the proxy's targets, ℓ predicted at the end under w0 (k,).
    w0: the corpus's token shares (k,), the static allocation. lrs: the run's LR at every step (T,);
    lr_warmup: its warm-up steps (the annealing area starts after it). anneal: the proxy's annealing gain C per
    domain (k,), the prior on C (default 0). noise_sd, prior_sd: nats (see `fit_online_law`).
    """

    def __init__(self, names: Sequence[str], init: np.ndarray, prior: np.ndarray, w0: np.ndarray, lrs: np.ndarray,
                 lr_warmup: int, *, anneal: np.ndarray | None = None, noise_sd: float = 0.02, prior_sd: float = 0.1):
        self.names = list(names)
        self.init = np.asarray(init, dtype=np.float64)
        self.prior = np.asarray(prior, dtype=np.float64)
        self.w0 = np.asarray(w0, dtype=np.float64) / float(np.sum(w0))
        lrs = np.asarray(lrs, dtype=np.float64)
        self.steps = lrs.size
        self.cum_lr = np.concatenate([[0.0], np.cumsum(lrs)])  # (T + 1,): Σ_{s < t} η_s
        _, s2 = lr_areas(lrs, int(min(lr_warmup, self.steps)))
        self.s2 = np.concatenate([[0.0], s2])  # (T + 1,): the annealing area after t steps
        self.anneal = np.zeros(len(self.names)) if anneal is None else np.asarray(anneal, dtype=np.float64)
        self.noise_sd, self.prior_sd = noise_sd, prior_sd
        # (step, losses (k,; None where the signal did not see the domain), own-token areas (k,))
        self.points: list[tuple[int, list[float | None], list[float]]] = []
        self._laws: list[OnlineLaw] | None = None

    # ------------------------------------------------------------------------------------ points

    def observe(self, step: int, losses: np.ndarray, schedule: Sequence[tuple[int, Sequence[float]]],
                observed: np.ndarray | None = None) -> None:
        """Add the losses (k,) measured after `step` steps; `schedule`: the sampler's (step, w) entries;
        observed: bool (k,), the domains the signal saw (the train signal's window may miss a small one: its
        stale estimate is not a new point)."""
        area = own_area(self.cum_lr, schedule, step)
        if self.points and step <= self.points[-1][0]:
            # A resumed run replays an update it had recorded: keep the first measurement, exactly.
            return
        seen = np.ones(len(self.names), dtype=bool) if observed is None else np.asarray(observed, dtype=bool)
        self.points.append((int(step), [float(v) if ok else None for v, ok in zip(losses, seen)],
                            [float(v) for v in area]))
        self._laws = None

    # ------------------------------------------------------------------------------------ the laws

    def laws(self) -> list[OnlineLaw]:
        """One law per domain from the points so far (MIN_POINTS of them at least; else the prior alone)."""
        if self._laws is None:
            s1_end, s2_end = self.cum_lr[-1], self.s2[-1]
            self._laws = []
            for i in range(len(self.names)):
                use = [(p[0], p[1][i], p[2][i]) for p in self.points if p[1][i] is not None]
                if len(use) < MIN_POINTS:
                    use = []
                steps = np.array([u[0] for u in use], dtype=np.int64)
                self._laws.append(fit_online_law(
                    np.array([u[2] for u in use]), self.s2[steps], np.array([u[1] for u in use]), self.init[i],
                    prior_x=self.w0[i] * s1_end, prior_s2=s2_end, prior_loss=self.prior[i], prior_C=self.anneal[i],
                    noise_sd=self.noise_sd, prior_sd=self.prior_sd))
        return self._laws

    def end_area(self, step: int, shares: np.ndarray, schedule: Sequence[tuple[int, Sequence[float]]]) -> np.ndarray:
        """Each domain's own-token area at the end if it keeps `shares` (k,) from `step` on, (k,)."""
        return own_area(self.cum_lr, schedule, step) + np.asarray(shares) * (self.cum_lr[-1] - self.cum_lr[step])

    def targets(self, step: int, shares: np.ndarray, schedule: Sequence[tuple[int, Sequence[float]]]) -> np.ndarray:
        """The mixture-aware targets: each domain's predicted final loss at `shares` (k,) from `step` on, (k,)."""
        x = self.end_area(step, shares, schedule)
        return np.array([law.predict(x[i], self.s2[-1]) for i, law in enumerate(self.laws())], dtype=np.float64)

    def static_predictions(self) -> np.ndarray:
        """Each domain's predicted final loss under w0 from step 0, by its current law, (k,)."""
        s1_end, s2_end = self.cum_lr[-1], self.s2[-1]
        return np.array([law.predict(self.w0[i] * s1_end, s2_end) for i, law in enumerate(self.laws())])

    def forgetting(self) -> np.ndarray:
        """bool (k,): domains whose own data is not predicted to lower their loss (their law's B >= 0)."""
        return np.array([not law.learns for law in self.laws()])

    def floors(self, step: int, max_rise: np.ndarray, schedule: Sequence[tuple[int, Sequence[float]]]) -> np.ndarray:
        """The smallest share from `step` on that keeps each domain within max_rise (k,) of its static
        prediction, (k,): 0 where any share does; a forgetting domain's floor is w0 (see the module doc).
        The floors may sum to more than 1 (no mixture keeps every promise): `mixing.lift_to_floors` then
        scales them down together and the caller warns."""
        now = own_area(self.cum_lr, schedule, step)
        left = self.cum_lr[-1] - self.cum_lr[step]  # the LR area still to be trained
        static = self.static_predictions()
        out = np.zeros(len(self.names))
        for i, law in enumerate(self.laws()):
            if not law.learns:
                out[i] = self.w0[i]
                continue
            if not np.isfinite(max_rise[i]):
                continue
            need = law.area_for(float(static[i] + max_rise[i]), float(self.s2[-1]))
            if left <= 0:
                continue
            out[i] = float(np.clip((need - now[i]) / left, 0.0, 1.0)) if np.isfinite(need) else 1.0
        return out

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"points": [[s, list(l), list(a)] for s, l, a in self.points]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        points = state.get("points")
        if not isinstance(points, list) or any(len(p) != 3 or len(p[1]) != len(self.names) for p in points):
            raise CheckpointError("the checkpoint's online-target points do not match this run's domains; resume "
                                  "with the data and config the run was started with")
        self.points = [(int(s), [None if v is None else float(v) for v in l], [float(v) for v in a])
                       for s, l, a in points]
        self._laws = None


def law_record(laws: Sequence[OnlineLaw], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """The fitted laws for mixture.jsonl: {domain: {B, E, beta, C, points}}."""
    return {n: {"B": law.B, "E": law.E, "beta": law.beta, "C": law.C, "points": law.points}
            for n, law in zip(names, laws)}
