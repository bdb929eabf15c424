import torch

from bench.core.spec import Method, Param


class LossAware(Method):
    """Loss-aware timestep sampling (Nichol & Dhariwal 2021; improved-diffusion ``resample.py``,
    LossSecondMomentResampler).

    Keeps the last `history` per-sample losses (unweighted MSE) at each t, fed back after every step
    (with several processes, every process's). Uniform until every t has `history`; then
    p(t) proportional to sqrt(mean of their squares), mixed as (1 - uniform_share) p + uniform_share / T.
    The importance weight 1 / (T p(t)) keeps the objective the baseline's in expectation (unbiased), so
    the weights have mean 1 under p by construction (weight_scale "source": nothing to normalise).
    The loss table is the method's state: saved in checkpoints, so a killed run resumes bit for bit.
    `describe` shows the cold start (uniform): the distribution depends on the losses a run sees."""

    name = "loss_aware"
    slots = frozenset({"timesteps", "weighting", "feedback"})
    weight_scale = "source"
    source = "Nichol & Dhariwal 2021 (improved-diffusion resample.py, LossSecondMomentResampler)"
    params = {
        "history": Param(10, "losses kept per timestep", low=1),
        "uniform_share": Param(0.001, "share of the uniform distribution mixed in", low=0.0, high=1.0, low_open=True),
    }

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.losses: torch.Tensor | None = None  # [T, history] float64, made at the first draw
        self.counts: torch.Tensor | None = None  # [T] int64: losses held per t (at most history)

    def warm(self) -> bool:
        return self.counts is not None and bool((self.counts == self.hp["history"]).all())

    def timestep_probs(self, p, schedule):
        T = schedule.T
        if self.losses is None:  # the first draw comes before the first feedback
            self.losses = torch.zeros(T, self.hp["history"], dtype=torch.float64)
            self.counts = torch.zeros(T, dtype=torch.int64)
        if not self.warm():
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        w = self.losses.square().mean(dim=1).sqrt()
        share = self.hp["uniform_share"]
        return (1 - share) * w / w.sum() + share / T

    def loss_weights(self, t, p, schedule, target):
        return 1.0 / (schedule.T * self.timestep_probs(p, schedule)[t])

    def observe(self, t, losses):
        H = self.hp["history"]
        for ti, loss in zip(t.tolist(), losses.tolist()):  # in batch order, as the source does
            n = int(self.counts[ti])
            if n == H:
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = loss
            else:
                self.losses[ti, n] = loss
                self.counts[ti] = n + 1

    def state_dict(self):
        return {} if self.losses is None else {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state):
        if state:
            self.losses, self.counts = state["losses"].clone(), state["counts"].clone()
