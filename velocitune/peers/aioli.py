"""The `aioli` rule (Chen et al. 2024), as its authors ran it: LearnParams rounds and the exponentiated update.

Source: HazyResearch/aioli @ 910d5249ec55c0e1ea1a25b9a7588640306f31cf, trainer/aioli_trainer.py
(`AioliTrainer.train`, `learn_params_subroutine`), main.py (argument defaults) and scripts/*/aioli/run.sh
(the runs). Pure numpy: no torch, no I/O. docs/design.md §3 gives the maths, the mapping onto the controller
and every difference from their code.

The run is cut into rounds of U steps, from the rule's first update step on. A round starts with LearnParams:
for `lp_rounds` sweeps over a random order of the k domains, train `lp_steps` steps at the mixture with
`one_hot_factor` f on that domain j and (1 - f)/(k - 1) elsewhere, evaluate the val loss ℓ (k,), and add the
drop ℓ_before - ℓ_after to column j of G (k, k). Then G /= lp_rounds; A solves M·A[i] = G[i] for each row i
(M[j] the mixture of block j; diagonal variant A_ii = G_ii / f; f = 1: A = G); optionally A is shifted to
non-negative and divided by its sum; with an EMA Ā <- (1 - γ)·A + γ·Ā, w = normalize(exp(η·Σ_i Ā[i])) (from
uniform every round), without one w <- normalize(w·exp(η·Σ_i A[i])) (cumulative, from uniform). The rest of
the round trains at w with no evaluation.

The controller asks the rule for its update steps (`AioliRule.schedule`) and calls `update` at each of them
with the val losses; each call returns the weights of the next block: a LearnParams mixture for lp_steps
steps, or the learned weights for the rest of the round (`record_fields` says which, for mixture.jsonl).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from velocitune.errors import ConfigError
from velocitune.mixing import Rule, Update, check_param

SOURCE = "HazyResearch/aioli@910d5249ec55c0e1ea1a25b9a7588640306f31cf"

# Defaults: the authors' three-domain run (scripts/arxiv_books_stackexchange/aioli/run.sh: 5000 steps of 8
# sequences; --eta 0.1 --ema 0.5 --one_hot_factor 0.5 --lp_rounds 4 --lp_steps 6 --update_steps 250
# --aioli_normalize_A), our domain sets having 3-4 domains. Their fixed step counts become fractions of the
# run: update_steps 250/5000 = 0.05, lp_steps 6/5000 = 0.0012 (at least one step). A value >= 1 is a step count.
DEFAULTS: dict[str, Any] = {
    "eta": 0.1, "ema": 0.5, "cumulative": False, "one_hot_factor": 0.5, "lp_rounds": 4, "lp_steps": 0.0012,
    "update_steps": 0.05, "normalize": True, "diagonal": False, "seed": 0,
}


# ------------------------------------------------------------------------------------------------ the maths


def learn_mixture(k: int, j: int, f: float) -> np.ndarray:
    """The LearnParams mixture of domain j: f on j, (1 - f)/(k - 1) on every other domain. Shape (k,)."""
    w = np.full(k, (1.0 - f) / (k - 1))
    w[j] = f
    return w


def mixture_matrix(k: int, f: float) -> np.ndarray:
    """M (k, k): row j is `learn_mixture(k, j, f)`; invertible unless f = 1/k (its eigenvalues are 1 and
    f - (1 - f)/(k - 1))."""
    return np.stack([learn_mixture(k, j, f) for j in range(k)])


def interaction_matrix(gain: np.ndarray, f: float, diagonal: bool) -> np.ndarray:
    """A (k, k) from the mean loss drops G (k, k; G[i, j]: drop of domain i's loss after a block on j).

    f = 1: A = G (one-hot blocks measure A directly). Otherwise G[i, j] = Σ_l M[j, l]·A[i, l], so each row
    solves M·A[i] = G[i], i.e. A = (M⁻¹·Gᵀ)ᵀ; the diagonal variant keeps A_ii = G_ii / f only.
    """
    k = gain.shape[0]
    if f == 1.0:
        return gain.copy()
    if diagonal:
        return np.diag(np.diag(gain) / f)
    return np.linalg.solve(mixture_matrix(k, f), gain.T).T


def normalize_interaction(a: np.ndarray) -> np.ndarray:
    """A shifted by its minimum when that is negative, then divided by its sum (their --aioli_normalize_A).

    A sum of 0 (every entry equal after the shift) is left at 0, so that the update changes nothing; theirs
    divides 0 by 0 (NaN weights)."""
    a = a - min(float(a.min()), 0.0)
    total = float(a.sum())
    return a / total if total > 0 else a


def exp_update(base: np.ndarray, signal: np.ndarray, eta: float) -> np.ndarray:
    """normalize(base·exp(η·signal)), computed in log space so that exp cannot overflow. Shapes (k,)."""
    with np.errstate(divide="ignore"):
        logits = np.log(base) + eta * signal
    w = np.exp(logits - logits.max())
    return w / w.sum()


def sweep_order(seed: int, round_index: int, k: int, lp_rounds: int) -> np.ndarray:
    """The LearnParams order of one round: lp_rounds permutations of the k domains, int (lp_rounds·k,), from a
    generator seeded with (seed, round) (theirs: np.random's global state, seeded once per run)."""
    rng = np.random.default_rng([int(seed), int(round_index)])
    return np.concatenate([rng.permutation(k) for _ in range(lp_rounds)])


# ------------------------------------------------------------------------------------------------ the timing


@dataclass(frozen=True)
class Timing:
    """The resolved rounds: the first starts after `first` optimizer steps; each lasts `round_steps`, of which
    the first lp_rounds·k·lp_steps are LearnParams blocks; none past `steps`."""

    first: int
    round_steps: int
    lp_steps: int
    lp_rounds: int
    k: int
    steps: int

    @property
    def blocks(self) -> int:
        """LearnParams blocks per round."""
        return self.lp_rounds * self.k

    def update_steps(self) -> list[int]:
        """The steps (optimizer steps done) at which the rule needs the val losses: each round's start and the
        end of each of its LearnParams blocks (the last one is where the learned weights begin)."""
        out: list[int] = []
        for start in range(self.first, self.steps, self.round_steps):
            out += [s for s in (start + j * self.lp_steps for j in range(self.blocks + 1)) if s < self.steps]
        return out


def _count(value: float, steps: int) -> tuple[int, bool]:
    """A step count given as a fraction of the run (< 1, at least 1 step) or as steps; and whether it was a fraction."""
    if value < 1:
        return max(1, int(round(value * steps))), True
    return int(value), False


def resolve_timing(update_steps: float, lp_steps: float, lp_rounds: int, k: int, first: int, steps: int) -> Timing:
    """The rounds of a `steps`-step run whose first round starts at `first`.

    A round must keep at least one step at its learned weights. A round given as a fraction of the run is
    raised to one sweep plus one step when shorter, and lp_rounds lowered until the blocks fit (so the scaled
    defaults work from a few dozen steps on); a round given in steps that the blocks fill is refused.
    """
    u, scaled = _count(update_steps, steps)
    lp, _ = _count(lp_steps, steps)
    if lp_rounds * k * lp >= u:
        if not scaled:
            raise ConfigError(
                f"rule 'aioli': {lp_rounds} LearnParams sweep(s) over {k} domains of {lp} step(s) fill the whole "
                f"round of {u} steps (mixing.params.update_steps), leaving none at the learned weights; raise "
                "update_steps or lower lp_rounds / lp_steps"
            )
        u = max(u, k * lp + 1)
        lp_rounds = min(lp_rounds, (u - 1) // (k * lp))
    return Timing(first=int(first), round_steps=u, lp_steps=lp, lp_rounds=lp_rounds, k=k, steps=int(steps))


# ------------------------------------------------------------------------------------------------ the rule


class AioliRule(Rule):
    """Aioli as a rule that sets its own update steps (`schedule`); see the module docstring.

    State (all in `state_dict`, JSON-safe): the round, the calls made in it, its sweep order, the loss after
    the last block (k,), the summed loss drops G (k, k), the EMA of A (k, k) and the last learned weights (k,).
    """

    def __init__(self, name: str, weights: np.ndarray, names: Sequence[str], *, eta: float, ema: float,
                 cumulative: bool, one_hot_factor: float, lp_rounds: int, lp_steps: float, update_steps: float,
                 normalize: bool, diagonal: bool, seed: int):
        super().__init__(name, weights, names)
        k = len(self.names)
        self.eta, self.ema, self.cumulative, self.f = eta, ema, cumulative, one_hot_factor
        self.lp_rounds, self.lp_steps, self.round_steps = lp_rounds, lp_steps, update_steps
        self.normalize, self.diagonal, self.seed = normalize, diagonal, seed
        self.timing: Timing | None = None  # set by `schedule`
        self._round = 0  # rounds whose weights were learned
        self._pos = 0  # calls made in the current round (0: its start is next)
        self._order: list[int] = []  # the round's block order, domain indices (lp_rounds·k,)
        self._prev: np.ndarray | None = None  # val loss after the last block, (k,)
        self._gain = np.zeros((k, k))  # Σ over sweeps of the loss drop of domain i after a block on j
        self._ema_graph: np.ndarray | None = None  # Ā (k, k)
        self._mix = np.full(k, 1.0 / k)  # the last learned weights; uniform = their weights_init
        self._fields: dict[str, Any] = {"block": "prior"}  # what the weights in force are (mixture.jsonl)

    def schedule(self, first: int, steps: int) -> list[int]:
        """The optimizer steps at which the rule needs the val losses, for a run of `steps` steps whose first
        round starts after `first` (the controller's warm-up; 0: at step 0, on ℓ_init). Sorted."""
        self.timing = resolve_timing(self.round_steps, self.lp_steps, self.lp_rounds, len(self.names), first, steps)
        return self.timing.update_steps()

    def record_fields(self) -> dict[str, Any]:
        """Keys for the mixture.jsonl record of the newest weights: block "learn" (a LearnParams block: its
        round, sweep and domain), "mix" (the learned weights for the rest of a round) or "prior" (w0 until
        the first round)."""
        return dict(self._fields)

    def _preview(self, losses, init, targets) -> Update:
        """Step 0: the first round starts here when the schedule says so (on ℓ_init, their loss_0)."""
        if self.timing is not None and self.timing.first == 0 and self._round == 0 and self._pos == 0:
            upd = self._advance(losses)
            self._w = upd.weights
            self._updates += 1
            return upd
        return Update(self._w.copy(), skipped=True)

    def _step(self, losses, init, targets, sampling_weights, *, step, observed) -> Update:
        return self._advance(losses)

    def _advance(self, losses: np.ndarray) -> Update:
        """One call: start a round, or close a LearnParams block; the weights of the next block."""
        if self.timing is None:
            raise ValueError("AioliRule.schedule(first, steps) must be called before the first update")
        k = len(self.names)
        if self._pos == 0:  # the round's start: ℓ before its first block
            self._order = sweep_order(self.seed, self._round, k, self.timing.lp_rounds).tolist()
            self._gain = np.zeros((k, k))
        else:  # the end of block pos - 1: its loss drop goes to the column of its domain
            self._gain[:, self._order[self._pos - 1]] += self._prev - losses
        self._prev = np.array(losses, dtype=np.float64)
        if self._pos < len(self._order):
            j = self._order[self._pos]
            self._fields = {"block": "learn", "round": self._round, "sweep": self._pos // k,
                            "learn_domain": self.names[j]}
            self._pos += 1
            return Update(learn_mixture(k, j, self.f))
        signal = self._learn()
        self._fields = {"block": "mix", "round": self._round}
        self._pos, self._round = 0, self._round + 1
        return Update(self._mix.copy(), signal)

    def _learn(self) -> np.ndarray:
        """A from the round's G, then the weights (self._mix); returns the signal Σ_i A[i] (or Ā), (k,)."""
        a = interaction_matrix(self._gain / self.timing.lp_rounds, self.f, self.diagonal)
        if self.normalize:
            a = normalize_interaction(a)
        if self.cumulative:  # their path without --ema: from the last learned weights
            signal = a.sum(axis=0)
            self._mix = exp_update(self._mix, signal, self.eta)
            return signal
        self._ema_graph = a if self._ema_graph is None else (1.0 - self.ema) * a + self.ema * self._ema_graph
        signal = self._ema_graph.sum(axis=0)
        self._mix = exp_update(np.full(len(self.names), 1.0 / len(self.names)), signal, self.eta)
        return signal

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(), "round": self._round, "pos": self._pos, "order": list(self._order),
            "prev": None if self._prev is None else self._prev.tolist(), "gain": self._gain.tolist(),
            "ema_graph": None if self._ema_graph is None else self._ema_graph.tolist(),
            "mix": self._mix.tolist(), "fields": dict(self._fields),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._round, self._pos, self._order = int(state["round"]), int(state["pos"]), [int(j) for j in state["order"]]
        self._prev = None if state["prev"] is None else np.array(state["prev"], dtype=np.float64)
        self._gain = np.array(state["gain"], dtype=np.float64).reshape(len(self.names), len(self.names))
        self._ema_graph = None if state["ema_graph"] is None else np.array(state["ema_graph"], dtype=np.float64)
        self._mix = np.array(state["mix"], dtype=np.float64)
        self._fields = dict(state["fields"])


# ------------------------------------------------------------------------------------------------ the builder


def _flag(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value in (0, 1):
        return bool(value)
    raise ConfigError(f"mixing.params.{key} (rule 'aioli') must be true or false, got {value!r}")


def _steps(key: str, value: Any) -> float:
    """A positive fraction of the run (< 1) or a whole number of steps (>= 1)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"mixing.params.{key} (rule 'aioli') must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0 and (v < 1 or v == int(v))):
        raise ConfigError(f"mixing.params.{key} (rule 'aioli') must be a fraction of the run in (0, 1) or a whole "
                          f"number of steps, got {value!r}")
    return v


def make_aioli(name: str, w0: np.ndarray, names: Sequence[str], **params: Any) -> AioliRule:
    """The `aioli` rule over `names`, from w0 (the weights in force before the first round, their aioli_prior);
    params: DEFAULTS's keys (None: the default). The registry's builder (rules.RuleSpec.build)."""
    unknown = sorted(key for key, v in params.items() if key not in DEFAULTS and v is not None)
    if unknown:
        raise ConfigError(f"rule 'aioli' has no parameter(s) {unknown} (its parameters: {sorted(DEFAULTS)})")
    given = {key: v for key, v in params.items() if v is not None}
    p = {**DEFAULTS, **given}
    k = len(names)
    if k < 2:
        raise ConfigError("rule 'aioli' needs at least two domains (its LearnParams mixtures spread 1 - f over the others)")
    cumulative = _flag("cumulative", p["cumulative"])
    if cumulative and "ema" in given:
        raise ConfigError("rule 'aioli': mixing.ema and mixing.params.cumulative=true exclude each other (their "
                          "code applies the EMA path whenever --ema is given); drop one")
    try:
        f = float(p["one_hot_factor"])
    except (TypeError, ValueError):
        f = math.nan
    if not 0 < f <= 1 or abs(f - 1.0 / k) < 1e-12:
        raise ConfigError(f"mixing.params.one_hot_factor (rule 'aioli') must be in (0, 1] and not 1/k = {1 / k:.4g} "
                          f"(the LearnParams mixtures are then all uniform), got {p['one_hot_factor']!r}")
    rounds = _steps("lp_rounds", p["lp_rounds"])
    if rounds < 1:
        raise ConfigError(f"mixing.params.lp_rounds (rule 'aioli') must be a whole number >= 1, got {p['lp_rounds']!r}")
    seed = p["seed"]
    if isinstance(seed, bool) or not float(seed).is_integer():
        raise ConfigError(f"mixing.params.seed (rule 'aioli') must be a whole number, got {seed!r}")
    return AioliRule(
        name, w0, names, eta=check_param(name, "eta", p["eta"]), ema=check_param(name, "ema", p["ema"]),
        cumulative=cumulative, one_hot_factor=f, lp_rounds=int(rounds), lp_steps=_steps("lp_steps", p["lp_steps"]),
        update_steps=_steps("update_steps", p["update_steps"]), normalize=_flag("normalize", p["normalize"]),
        diagonal=_flag("diagonal", p["diagonal"]), seed=int(seed))


__all__ = ["DEFAULTS", "SOURCE", "AioliRule", "Timing", "exp_update", "interaction_matrix", "learn_mixture",
           "make_aioli", "mixture_matrix", "normalize_interaction", "resolve_timing", "sweep_order"]
