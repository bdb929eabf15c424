import math

from bench.core.spec import Method, OptimizerSettings, Param, progress_ramp


def compensation(rule: str, b0: float, b: float) -> float:
    """Learning-rate factor c that offsets lowering Adam's beta1 from b0 to b.

    variance: keep the RMS of Adam's first moment under white-noise gradients constant,
              sqrt(((1 - b0) / (1 + b0)) / ((1 - b) / (1 + b))).
    demon:    (1 - b0) / (1 - b), a third-party reading in the spirit of Demon.
    none:     1, momentum decay alone.
    """
    if rule == "variance":
        return math.sqrt(((1 - b0) / (1 + b0)) / ((1 - b) / (1 + b)))
    if rule == "demon":
        return (1 - b0) / (1 - b)
    return 1.0


class MDLRC(Method):
    """Momentum decay with learning-rate compensation (Xu et al. 2024).

    beta1(p) = beta1_start + (beta1_end - beta1_start) * min(1, p / ramp), and
    lr(p) = lr_base * c(p) with c from the named compensation rule.

    Reconstruction (METHODS.md): the paper's numbers were not readable; the 0.9 -> 0.5 decay,
    the linear ramp and all three compensation rules are the suite's choices.
    """

    name = "mdlrc"
    slots = frozenset({"optimizer"})
    budget_dependent = True  # beta1(p) follows progress = step / iters: another budget, another schedule
    source = "Xu et al. 2024 (seed paper); schedule and compensation rules are the suite's reconstruction"
    params = {
        "beta1_start": Param(0.9, "Adam beta1 at p = 0", low=0.0, high=1.0, high_open=True),
        "beta1_end": Param(0.5, "Adam beta1 once the ramp is over", low=0.0, high=1.0, high_open=True),
        "ramp": Param(1.0, "progress at which beta1 reaches beta1_end", low=0.0, high=1.0, low_open=True),
        "compensation": Param("variance", "learning-rate compensation rule", choices=("variance", "demon", "none")),
    }

    def optimizer(self, p):
        b0, b1 = self.hp["beta1_start"], self.hp["beta1_end"]
        beta1 = b0 + (b1 - b0) * progress_ramp(p, self.hp["ramp"])
        return OptimizerSettings(lr_scale=compensation(self.hp["compensation"], b0, beta1), beta1=beta1)
