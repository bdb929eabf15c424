
from bench.core.spec import Method, Param, weight_from_eps


class P2(Method):
    """P2 weighting (Choi et al. 2022): w_eps = 1 / (k + SNR)^gamma.

    Converted to x0 and v targets through w_x0 = w_eps * SNR, w_v = w_x0 / (SNR + 1)
    (METHODS.md), so all three targets optimise the same weighted objective.
    Nothing here is a reconstruction: the formula and defaults are the paper's (gamma 1; the
    paper also uses 0.5).
    """

    name = "p2"
    slots = frozenset({"weighting"})
    weight_scale = "source"  # the seed paper's study used the source's scale; its committed results keep it
    source = "Choi et al. 2022 (Perception Prioritized Training), P2-weighting repository"
    params = {
        "gamma": Param(1.0, "exponent of the weight", low=0.0),
        "k": Param(1.0, "offset that keeps the weight finite at SNR = 0", low=0.0, low_open=True),
    }

    def loss_weights(self, t, p, schedule, target):
        snr = schedule.snr[t]
        w_eps = 1.0 / (self.hp["k"] + snr) ** self.hp["gamma"]
        return weight_from_eps(w_eps, snr, target)
