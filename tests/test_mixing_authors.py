"""The `odm`, `dbl`, `aioli` and `ado` rules against our own transcriptions of their authors' updates.

Each reference below is a transcription, written for this test, of the update function in the authors'
public code, kept in their structure (per-name dicts and Python floats for ODM, torch float32 for DBL) so
that it shares no code with velocitune.mixing:

- ODM: alon-albalak/online-data-mixing, commit edbfdadb62b0388120b6198b1743067a7cd990dc,
  megatron/data/data_sampling_utils.py, SmoothedMeanWeightUpdater.group_update (the class the README
  names as the paper's implementation; scripts/train_1B_ema*.sh run it with mixed mini-batches, so
  megatron/training.py calls group_update after every step with the mean loss of each domain present in
  the batch), behind DynamicDataSamplingWeight's UpdateScheduler (update when iteration > warmup).
- DBL: princeton-nlp/LLM-Shearing, commit b87218b566c73f6b246aaad3e4c42883f65a48a6,
  llmshearing/callbacks/dynamic_loading_callback.py, DynamicLoadingCallback.update_proportion with
  update_type "doremi", called from eval_end with the evaluation losses.
- Aioli: HazyResearch/aioli, commit 910d5249ec55c0e1ea1a25b9a7588640306f31cf, trainer/aioli_trainer.py,
  AioliTrainer.train (no prior, no graph) and learn_params_subroutine, driven by a synthetic loss model; ours
  runs through the MixingController (its rule-set update steps), the sampler and the rule.
- ADO: yidingjiang/ado, commit 731863df66c2378e426eb07e188c8d731d58787d, src/data_selectors/ado.py, AdoSelector
  (train-loss path) called after every step; its fit by scipy's L-BFGS-B from the whole grid (jax is not here).

Remaining differences, documented in the README's rule table and docs/design.md §3: we compute in
float64 (their DBL runs in float32: one update of theirs agrees to float32 precision, a whole
trajectory of theirs computed in float64 agrees to 1e-11); the train signal of a window longer than
one step averages its steps (ODM runs with m = 1, where it is the step's loss, as theirs).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from velocitune.mixing import make_rule
from velocitune.rules import timing as rule_timing

ODM_COMMIT = "alon-albalak/online-data-mixing@edbfdadb62b0388120b6198b1743067a7cd990dc"
DBL_COMMIT = "princeton-nlp/LLM-Shearing@b87218b566c73f6b246aaad3e4c42883f65a48a6"


class AuthorsODM:
    """Transcription of SmoothedMeanWeightUpdater (group_update path) with its update scheduler."""

    def __init__(self, names, weights, smoothing_factor, warmup_steps, update_frequency=1):
        self.names = list(names)
        self.k = len(names)
        self.weights = list(weights)
        total = sum(weights)
        self.probabilities = {n: w / total for n, w in zip(names, weights)}
        self.estimated_reward = {n: 0.0 for n in names}
        self.eps = 1 / self.k
        self.prev_eps = None
        self.alpha = smoothing_factor
        self.warmup_steps, self.update_frequency = warmup_steps, update_frequency

    def step(self, iteration, batch_losses):
        """After optimizer step `iteration` (1-based), with {domain: mean loss} of the domains in the batch."""
        if not (iteration > self.warmup_steps and iteration % self.update_frequency == 0):
            return list(self.probabilities.values())
        self.prev_eps = self.eps
        self.eps = min(1 / self.k, math.sqrt(math.log(self.k) / (self.k * iteration)))
        for name, loss in batch_losses.items():
            self.estimated_reward[name] = self.alpha * self.estimated_reward[name] + (1 - self.alpha) * math.exp(loss)
        total = sum(r * self.prev_eps for r in self.estimated_reward.values())
        scale = (1 - self.k * self.eps) / total
        for i, name in enumerate(self.names):
            self.weights[i] = self.estimated_reward[name] * self.prev_eps * scale + self.eps
        total_w = sum(self.weights)
        for i, name in enumerate(self.names):
            self.probabilities[name] = self.weights[i] / total_w
        return list(self.probabilities.values())


def authors_dbl(current_prop, losses, target_loss, dtype=torch.float32):
    """Transcription of DynamicLoadingCallback.update_proportion, update_type 'doremi'.

    Theirs runs in torch's default float32; `dtype` lets the test follow a whole trajectory in float64.
    """
    diff = torch.tensor(losses, dtype=dtype) - torch.tensor(target_loss, dtype=dtype)
    eta, c = 1.0, 1e-4
    alpha = torch.softmax(torch.log(torch.tensor(current_prop, dtype=dtype)) + eta * diff, dim=0)
    new = ((1 - c) * alpha + c / len(current_prop)).numpy().astype("float64")
    return (new / new.sum()).tolist()


def _domains(seed: int, k_max: int):
    """A seeded generator, 2..k_max domain names and a random starting mixture over them."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, k_max + 1))
    return rng, [f"d{i}" for i in range(k)], rng.dirichlet(np.ones(k))


@pytest.mark.parametrize("seed", range(4))
def test_odm_matches_the_authors_update(seed):
    """Per-step losses of a random subset of domains, through both; the weights agree at every step."""
    rng, names, w0 = _domains(seed, k_max=6)
    k = len(names)
    steps = 300
    warmup = int(round(rule_timing("odm")["warmup"] * steps))  # our default: 2 %, their 2000 of 100k
    ref = AuthorsODM(names, w0.tolist(), smoothing_factor=0.9, warmup_steps=warmup)
    ours = make_rule("odm", w0, names)
    base = rng.uniform(1.0, 4.0, k)
    last = base.copy()
    for it in range(1, steps + 1):
        seen = rng.random(k) < 0.7  # a domain may be absent from a step's batch
        losses = base * (1 - 0.3 * it / steps) + rng.normal(0, 0.05, k)
        want = ref.step(it, {n: float(v) for n, v, s in zip(names, losses, seen) if s})
        if it > warmup:  # our controller calls the rule only when an update is due
            last = np.where(seen, losses, last)  # the carried estimate of an unobserved domain
            got = ours.update(it, last, None, None, observed=seen).weights
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=f"{ODM_COMMIT}, step {it}")
        else:
            np.testing.assert_allclose(ours.initial_weights(), want, rtol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_dbl_matches_the_authors_update(seed):
    """Evaluation losses above and below the reference, through both, over 40 updates."""
    rng, names, w0 = _domains(seed, k_max=7)
    k = len(names)
    target = rng.uniform(1.0, 3.0, k)
    ours = make_rule("dbl", w0, names)
    prop = w0.tolist()
    for t in range(1, 41):
        losses = target + rng.normal(0.05, 0.2, k)  # some domains below their reference
        # One update of theirs in float32 from the same state: equal to float32 precision.
        single = authors_dbl(prop, losses.tolist(), target.tolist())
        prop = authors_dbl(prop, losses.tolist(), target.tolist(), dtype=torch.float64)
        got = ours.update(t, losses, None, target).weights
        np.testing.assert_allclose(got, single, rtol=1e-5, atol=1e-7, err_msg=f"{DBL_COMMIT}, update {t}")
        np.testing.assert_allclose(got, prop, rtol=1e-11, atol=1e-15, err_msg=f"{DBL_COMMIT} (float64), update {t}")


def test_default_timing_is_the_authors():
    """ODM: every step, training loss, after 2 % of the run; DBL: at every evaluation from the start."""
    assert rule_timing("odm") == {"signal": "train", "interval": 1, "warmup": 0.02}
    assert rule_timing("dbl")["signal"] == "eval" and rule_timing("dbl")["warmup"] == 0.0


# ----------------------------------------------------------------------------------------------------- aioli

AIOLI_COMMIT = "HazyResearch/aioli@910d5249ec55c0e1ea1a25b9a7588640306f31cf"


class LossModel:
    """A synthetic run: tokens per domain T (k,) grow by B·p per step at mixture p; the val loss is
    ℓ = ℓ0 - A_true·(1 - exp(-T/S)), so training on domain j lowers every domain i by A_true[i, j]·(gain)."""

    def __init__(self, rng, k, batch):
        self.a_true = rng.uniform(0.0, 0.1, (k, k)) + np.diag(rng.uniform(0.2, 0.5, k))
        self.l0, self.scale, self.batch = rng.uniform(2.0, 4.0, k), rng.uniform(200.0, 600.0, k), batch
        self.tokens = np.zeros(k)

    def train(self, p, steps):
        for _ in range(steps):
            self.tokens = self.tokens + self.batch * np.asarray(p)

    def evaluate(self):
        return self.l0 - self.a_true @ (1.0 - np.exp(-self.tokens / self.scale))


def authors_aioli(sim, *, k, eta, ema, f, lp_rounds, lp_steps, update_steps, normalize, diagonal, total_steps,
                  batch, seed):
    """Transcription of AioliTrainer.train (no aioli_prior, no graph_path) and learn_params_subroutine: the learned
    weights (normalised) of each round. The one substitution: the sweep order's np.random.permutation (global
    state) draws from default_rng([seed, round]), the generator our rule uses, so that both see the same blocks."""

    def learn_params_subroutine(loss_0, i):
        previous_loss = loss_0.copy()
        new_graph = np.zeros((k, k))
        rng = np.random.default_rng([seed, i])
        mixture_order = np.concatenate([rng.permutation(k) for _ in range(lp_rounds)])
        for onehot_idx in mixture_order:
            weights = np.ones(k) * (1 - f) / (k - 1)
            weights[onehot_idx] = f
            sim.train(weights / weights.sum(), lp_steps)
            new_loss = sim.evaluate()
            new_graph[:, onehot_idx] += previous_loss - new_loss
            previous_loss = new_loss
        new_graph /= lp_rounds
        if f != 1 and not diagonal:
            weight_matrix = np.zeros((k, k))
            for i in range(k):
                weight_row = np.ones(k) * (1 - f) / (k - 1)
                weight_row[i] = f
                weight_matrix[i] = weight_row
            A = np.zeros((k, k))
            for i, row in enumerate(new_graph):
                A[i] = np.linalg.solve(weight_matrix, row)
            new_graph = A
        elif f != 1 and diagonal:
            A = np.zeros((k, k))
            for i in range(k):
                A[i, i] = new_graph[i, i] / f
            new_graph = A
        return new_graph

    weights_init = np.ones(k)
    weights = weights_init
    lp_duration = lp_rounds * lp_steps * k
    n_data = update_steps * batch - lp_duration
    counter, learned = 0, []
    num_iterations = -(-total_steps // update_steps)
    for i in range(num_iterations):
        loss_0 = sim.evaluate()
        graph = learn_params_subroutine(loss_0, i)
        counter += lp_duration
        if normalize:
            min_entry = graph.min()
            if min_entry < 0:
                graph -= min_entry
            graph /= graph.sum()
        if ema is not None:
            ema_graph = graph if i == 0 else (1 - ema) * graph + ema * ema_graph  # noqa: F821 (set at i == 0)
            weights = np.multiply(weights_init, np.exp(eta * ema_graph.sum(axis=0)))
        elif i == 0:
            weights = np.multiply(weights_init, np.exp(eta * graph.sum(axis=0)))
        else:
            weights = np.multiply(weights, np.exp(eta * graph.sum(axis=0)))
        learned.append(weights / sum(weights))
        for _ in range(-(-n_data // batch)):  # their dataloader over n_data sequences
            sim.train(weights / sum(weights), 1)
            counter += 1
            if counter % update_steps == 0:
                break
        if counter == total_steps:
            break
    return learned


AIOLI_CASES = {  # their runs' settings (scripts/*/aioli/run.sh) and the code paths they do not take
    "3-domain run": dict(k=3, eta=0.1, ema=0.5, f=0.5, lp_rounds=4, lp_steps=2, normalize=True, diagonal=False),
    "2-domain run": dict(k=2, eta=0.2, ema=0.1, f=0.625, lp_rounds=4, lp_steps=1, normalize=True, diagonal=False),
    "7-domain run": dict(k=7, eta=1.0, ema=0.1, f=0.75, lp_rounds=2, lp_steps=1, normalize=True, diagonal=False),
    "no ema, raw A": dict(k=4, eta=0.5, ema=None, f=0.6, lp_rounds=2, lp_steps=2, normalize=False, diagonal=False),
    "one-hot": dict(k=3, eta=1.0, ema=None, f=1.0, lp_rounds=1, lp_steps=3, normalize=True, diagonal=False),
    "diagonal": dict(k=3, eta=2.0, ema=0.3, f=0.5, lp_rounds=2, lp_steps=1, normalize=False, diagonal=True),
}


@pytest.mark.parametrize("case", sorted(AIOLI_CASES))
def test_aioli_matches_the_authors_update(case):
    """The same synthetic run through their loop and through our controller (hook, sampler, rule): the LearnParams
    mixtures and the learned weights of every round agree.

    Tolerance rtol 1e-12: the two sides differ only by rounding (theirs normalises exp(η·ΣA) at the end, ours in
    log space, and ours trains the loss model on the sampler's renormalised ŵ; the solve (cond(M) <= 4 here) and the
    cumulative path carry it over 6 rounds); the largest difference measured is 1.1e-14 (7 domains)."""
    from velocitune.controller import MixingController
    from velocitune.peers.aioli import make_aioli
    from velocitune.sampler import MixtureSampler

    c = AIOLI_CASES[case]
    k, batch, update_steps, rounds = c["k"], 8, 3 * c["lp_rounds"] * c["k"] * c["lp_steps"], 6
    steps = rounds * update_steps
    rng = np.random.default_rng(sum(map(ord, case)))
    ref_sim = LossModel(rng, k, batch)
    our_sim = copy.deepcopy(ref_sim)
    want = authors_aioli(ref_sim, k=k, eta=c["eta"], ema=c["ema"], f=c["f"], lp_rounds=c["lp_rounds"],
                         lp_steps=c["lp_steps"], update_steps=update_steps, normalize=c["normalize"],
                         diagonal=c["diagonal"], total_steps=steps, batch=batch, seed=7)
    names = [f"d{i}" for i in range(k)]
    params = dict(eta=c["eta"], one_hot_factor=c["f"], lp_rounds=c["lp_rounds"], lp_steps=c["lp_steps"],
                  update_steps=update_steps, normalize=c["normalize"], diagonal=c["diagonal"], seed=7)
    params.update(cumulative=True) if c["ema"] is None else params.update(ema=c["ema"])
    rule = make_aioli("aioli", np.ones(k) / k, names, **params)
    sampler = MixtureSampler(seed=0, global_batch=batch, windows_per_domain=[10**7] * k, initial_weights=np.ones(k) / k,
                             max_repetition=1.0, names=names)
    ctl = MixingController(rule, sampler, steps=steps, warmup=0, interval=1, signal="eval", targets=None, seq_len=4,
                           device=torch.device("cpu"), keep_records=True)
    ctl.start(our_sim.evaluate())
    for step in range(steps):
        our_sim.train(ctl.plan(step).sampling_weights, 1)
        if ctl.due(step + 1):
            ctl.update(step + 1, our_sim.evaluate(), None)
    mixes = [r for r in ctl.records if r["block"] == "mix"]
    assert len(mixes) == rounds and len(want) == rounds
    for r, (rec, ref) in enumerate(zip(mixes, want)):
        assert rec["step"] == r * update_steps + c["lp_rounds"] * k * c["lp_steps"]
        got = np.array([rec["weights"][n] for n in names])
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15, err_msg=f"{AIOLI_COMMIT}, {case}, round {r}")
    # The weights moved from uniform far beyond the tolerance: the comparison can fail.
    assert max(float(np.abs(w - 1 / k).max()) for w in want) > 1e-4
    np.testing.assert_allclose(our_sim.tokens, ref_sim.tokens, rtol=1e-12)  # same blocks, same mixtures, same steps


# ---------------------------------------------------------------------------------------------------- ADO
# yidingjiang/ado, commit 731863df66c2378e426eb07e188c8d731d58787d, src/data_selectors/ado.py: AdoSelector.update,
# curr_dist, compute_scaling_law_params (y_axis "train_loss", use_same_step_size True), clip_min_probability,
# huber_loss, logsumexp, loss_fn, scaling_law, fit_scaling_law; called after every step with itr from 0
# (src/train.py, src/dataloader/adaptive_loader.py). Theirs fits with jaxopt's LBFGS vmapped over the 512 grid
# starts; jax is not installed here, so the transcription runs scipy's L-BFGS-B from every grid point on their
# loss_fn (its gradient written here, apart from ours) and keeps nanargmin of the final objectives.
ADO_COMMIT = "yidingjiang/ado@731863df66c2378e426eb07e188c8d731d58787d"


def _ado_huber(target, pred, delta=1e-3):
    d = np.abs(target - pred)
    return np.where(d > delta, delta * (d - .5 * delta), 0.5 * d ** 2)


def _ado_loss_and_grad(params_3, D, L):
    a, e, alpha = params_3
    arg1 = a - alpha * np.log(D)
    stacked = np.stack((arg1, e + np.zeros(arg1.shape)), axis=0)
    m = np.max(stacked, axis=0, keepdims=True)  # their logsumexp
    pred = np.squeeze(np.log(np.sum(np.exp(stacked - m), axis=0, keepdims=True)) + m, axis=0)
    res = np.log(L) - pred
    loss = (np.sum(_ado_huber(np.log(L), pred)) + max(alpha - 0.8, 0) - min(alpha, 0.001) + max(a - 6.5, 0)
            - min(e - 0.5, 0))
    dh = np.where(np.abs(res) > 1e-3, 1e-3 * np.sign(res), res)  # d huber / d res
    soft = np.exp(arg1 - pred)  # d pred / d arg1
    step = lambda v: float(v > 0) + 0.5 * float(v == 0)  # noqa: E731 (jax's derivative of max(v, 0))
    grad = np.array([-np.sum(dh * soft) + step(a - 6.5), -np.sum(dh * (1 - soft)) - step(0.5 - e),
                     np.sum(dh * soft * np.log(D)) + step(alpha - 0.8) - step(0.001 - alpha)])
    return loss, grad


def _ado_fit_scaling_law(D_T, losses_T):
    from scipy.optimize import minimize

    X, Y, Z = np.meshgrid(np.arange(-2, 6, 1), np.arange(-2, 2, 0.5), np.arange(0, 0.8, 0.1), indexing="ij")
    grid = np.stack((X.flatten(), Y.flatten(), Z.flatten()), axis=1).astype(float)
    runs = [minimize(_ado_loss_and_grad, g, args=(D_T, losses_T), jac=True, method="L-BFGS-B",
                     options={"maxiter": 200, "gtol": 1e-5}) for g in grid]
    return runs[int(np.nanargmin([r.fun for r in runs]))].x


def _ado_clip_min_probability(probs, min_prob):
    total_deficit = max(min_prob * len(probs) - probs.sum(), 0)
    scaled = probs * ((1 - total_deficit) / probs.sum())
    clipped = np.maximum(scaled, min_prob)
    return clipped / clipped.sum()


class AuthorsADO:
    """Transcription of AdoSelector (train-loss path, one host); `fit` fits one domain (theirs: the grid search)."""

    def __init__(self, task_token_count, ignore_steps, start_step, update_interval, fit=_ado_fit_scaling_law):
        self.k = len(task_token_count)
        self.empirical_dist = task_token_count / task_token_count.sum()
        self.ignore_steps, self.start_step, self.update_interval, self.fit = (
            ignore_steps, start_step, update_interval, fit)
        self.current_params = None
        self.fits = []  # (cum_cnt, filtered losses, params) of every refit, for the test
        self.task_cnt_TxK = np.empty((0, self.k), dtype=np.int32)
        self.task_loss_TxK = np.empty((0, self.k), dtype=np.float32)
        self.p = self.p_avg = self.p_history = self.empirical_dist

    def update(self, counts_K, task_loss_K, itr):
        self.task_cnt_TxK = np.append(self.task_cnt_TxK, np.ones_like(counts_K[None]) * counts_K.sum(), axis=0)
        self.p_history = 0.9 * self.p_history + 0.1 * counts_K / counts_K.sum()
        self.task_loss_TxK = np.append(self.task_loss_TxK, task_loss_K[None], axis=0)
        if itr >= self.start_step and itr % self.update_interval == 0:
            params = self.compute_scaling_law_params()
            if not (np.isnan(np.sum(params)) or np.isinf(np.sum(params))):
                self.current_params = params

    def compute_scaling_law_params(self):
        from scipy.signal import savgol_filter

        cum_cnt_KxT = np.cumsum(self.task_cnt_TxK, 0)[self.ignore_steps::10].T
        task_loss_KxT = savgol_filter(self.task_loss_TxK.T, 101, 3, axis=-1)[:, self.ignore_steps::10]
        params = np.stack([self.fit(d, lo) for d, lo in zip(cum_cnt_KxT, task_loss_KxT)])
        self.fits.append((cum_cnt_KxT, task_loss_KxT, params))
        return params

    def curr_dist(self, itr):
        if itr < self.start_step or self.current_params is None:
            return None
        a, e, alpha = self.current_params[:, 0], self.current_params[:, 1], self.current_params[:, 2]
        irred_loss_K = np.exp(e)
        expnt_K = np.maximum(alpha, 0.05)
        n = self.task_cnt_TxK.sum(0)
        curr_loss_K = np.exp(e) + np.exp(a) / n ** alpha
        slope_K = expnt_K * (curr_loss_K - irred_loss_K) / np.float32(n)
        weighted = slope_K * self.empirical_dist * (self.p_history * (1 - self.p_history)) ** 0.5
        dist_K = _ado_clip_min_probability(weighted / weighted.sum(), 1e-2)
        self.p = 0.9 * self.p_avg + 0.1 * dist_K
        self.p_avg = (1 - 1 / (itr + 1)) * self.p_avg + 1 / (itr + 1) * dist_K
        return self.p


def _ado_run(ref, ours, steps, batch, rng):
    """Feed both the same batches (drawn from the transcription's p) after every itr = 0 .. steps - 1; return
    [(itr, theirs, ours)] from the first itr theirs returns a distribution."""
    counts0 = ref.empirical_dist
    truth = np.array([[1.5, 0.7, 0.4], [2.0, 0.6, 0.5]])  # (a, e, α) per domain
    out = []
    for itr in range(steps):
        p = np.asarray(ref.p, dtype=np.float64)
        counts = rng.multinomial(batch, p / p.sum())
        n = (itr + 1) * batch
        losses = np.exp(truth[:, 1]) + np.exp(truth[:, 0]) / n ** truth[:, 2] + rng.normal(0, 0.01, 2)
        ref.update(counts, losses, itr)
        want = ref.curr_dist(itr)
        upd = ours.update(itr + 1, losses, None, None, sampling_weights=counts / batch)
        assert upd.skipped == (want is None), f"{ADO_COMMIT}, itr {itr}"
        if want is not None:
            out.append((itr, want / want.sum(), upd.weights))
    assert max(float(np.abs(w - counts0).max()) for _, w, _ in out) > 0.02  # the mixture moved
    return out


def _ado_pair(fit=_ado_fit_scaling_law, start=100, steps=301, batch=64):
    from velocitune.peers.ado import make_ado

    w0 = np.array([0.6, 0.4])
    ref = AuthorsADO(w0 * 10, ignore_steps=start, start_step=start, update_interval=start, fit=fit)
    ours = make_ado("ado", w0, ["a", "b"], samples_per_step=batch)
    assert list(ours.schedule(start, steps)) == list(range(1, steps))  # every step, from the first
    return ref, ours, _ado_run(ref, ours, steps, batch, np.random.default_rng(0))


def test_ado_matches_the_authors_update_given_the_same_fit():
    """Their loop (history from itr 0, filter, the rows fitted, refits at start, 2·start, the EMA, curr_dist, the
    clip, the averaging) with each fit done by our fit_laws: the weights agree to rounding (1e-12) at every step
    from their start_step (100 of 301 steps here, their 1000 of 60000, at least the filter's 101 rows)."""
    from velocitune.peers.ado import fit_laws

    ref, ours, out = _ado_pair(fit=lambda d, lo: fit_laws(d, lo[:, None])[0])
    assert [len(d[0]) for d, _, _ in ref.fits] == [1, 11, 21]  # their first fit sees one point
    for itr, want, got in out:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"{ADO_COMMIT}, itr {itr}")
    np.testing.assert_array_equal(np.array(ours.state_dict()["params"]), ref.current_params)


@pytest.mark.slow  # ~3 min: 3 refits x 2 domains x 512 scipy runs
def test_ado_fit_matches_the_authors_grid_search():
    """Their fit as written (every grid start, nanargmin) against ours on the same filtered points, at every refit
    of a run: the objective agrees to 1e-8 (measured 1.8e-9, ours the lower) and the law at the fitted points to 1e-4 (relative); the parameters
    need not, since the objective is flat along a valley (one point at the first refit). The difference this makes
    to the weights (measured: up to 0.26 here, the minima reached differing by < 2e-9 in objective) is a
    documented difference (docs/design.md §3): it is the optimiser, not the update (see the test above)."""
    from velocitune.peers.ado import fit_laws, fit_objective

    ref, ours, out = _ado_pair()
    for d_kt, l_kt, theirs in ref.fits:
        mine = fit_laws(d_kt[0], l_kt.T)
        for i in range(2):
            f = lambda q, d=d_kt[i], lo=l_kt[i]: _ado_loss_and_grad(q, d, lo)[0]  # noqa: E731
            assert abs(f(mine[i]) - f(theirs[i])) < 1e-8, (ADO_COMMIT, len(d_kt[i]), f(mine[i]), f(theirs[i]))
            law = lambda q, d=d_kt[i]: np.exp(q[1]) + np.exp(q[0]) / d ** q[2]  # noqa: E731
            np.testing.assert_allclose(law(mine[i]), law(theirs[i]), rtol=1e-4)
            assert abs(fit_objective(mine[i][None], np.log(d_kt[i]), np.log(l_kt[i])[None])[0][0] - f(mine[i])) < 1e-12
    gap = max(float(np.abs(got - want).max()) for _, want, got in out)
    print(f"ado: max |w_ours - w_theirs| over the run = {gap:.3g}")
    assert 0 < gap < 0.3, gap  # measured 0.26: flat valleys extrapolate to different E and reducible losses


def test_ado_default_timing_is_the_authors():
    """Every step, training loss, first update after 1/60 of the run (their 1000 of 60000 steps)."""
    assert rule_timing("ado") == {"signal": "train", "interval": 1, "warmup": 1 / 60}
