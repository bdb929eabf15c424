from bench.core.registry import get_method_class
from bench.core.spec import Method, OptimizerSettings, Param


class LRControl(Method):
    """Control for MDLRC: its learning-rate trajectory with Adam's beta1 left at the base value.

    lr(p) = lr_base * c(p), with c(p) exactly MDLRC's compensation factor for the same
    hyperparameters (methods/mdlrc.py), and beta1 fixed. Set beside `mdlrc` and
    `mdlrc compensation=none`, it tells which of the two parts, momentum decay or the
    learning-rate decay the compensation brings, moves the metric (METHODS.md, "Controls").
    """

    name = "lr_control"
    slots = frozenset({"optimizer"})
    budget_dependent = True  # MDLRC's c(p) follows progress = step / iters
    source = "control for Xu et al. 2024's MDLRC (the suite's own; METHODS.md 'Controls')"
    params = {
        "beta1_start": Param(0.9, "MDLRC's beta1 at p = 0 (only shapes c(p); beta1 stays fixed)", low=0.0, high=1.0,
                             high_open=True),
        "beta1_end": Param(0.5, "MDLRC's beta1 after the ramp (only shapes c(p))", low=0.0, high=1.0, high_open=True),
        "ramp": Param(1.0, "progress at which MDLRC's ramp ends", low=0.0, high=1.0, low_open=True),
        "compensation": Param("variance", "MDLRC's compensation rule whose lr factor is applied",
                              choices=("variance", "demon")),
    }

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.mdlrc = get_method_class("mdlrc")(**self.hp)

    def optimizer(self, p):
        return OptimizerSettings(lr_scale=self.mdlrc.optimizer(p).lr_scale)
