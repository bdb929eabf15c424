from bench.core.spec import SLOTS, Method, Param, ema_decay_at
from bench.errors import HyperparameterError


class Combined(Method):
    """Several methods at once, each filling its own slots; the paper's combination is
    clts + mdlrc (Xu et al. 2024), the default.

    `parts` lists method names joined by '+'. A part's hyperparameter is set as
    PART.KEY (e.g. ``--set clts.mu=0.2``). Two parts that fill the same slot are refused,
    naming the slot, because their effects could not be told apart. The parts' state (a feedback
    method's) is saved per part.
    """

    name = "combined"
    slots = frozenset(SLOTS)  # it may fill any slot; an instance narrows this to its parts' slots
    source = "Xu et al. 2024 (clts + mdlrc); any non-overlapping list of methods"
    params = {"parts": Param("clts+mdlrc", "methods to combine, joined by '+'")}

    def __init__(self, **overrides):
        from bench.core.registry import get_method_class

        nested = {k: overrides.pop(k) for k in list(overrides) if "." in k}
        super().__init__(**overrides)
        names = [n for n in self.hp["parts"].split("+") if n]
        if not names or "combined" in names:
            raise HyperparameterError(
                f"method 'combined': parts={self.hp['parts']!r} must list other methods joined by '+', e.g. clts+mdlrc"
            )
        part_params = {n: {} for n in names}
        for key, value in nested.items():
            part, sub = key.split(".", 1)
            if part not in part_params:
                raise HyperparameterError(
                    f"method 'combined': {key}={value!r} names part {part!r}, which is not in parts={self.hp['parts']!r}"
                )
            part_params[part][sub] = value
        self.parts = [get_method_class(n)(**part_params[n]) for n in names]
        self.owner = {}
        for part in self.parts:
            for slot in part.slots:
                if slot in self.owner:
                    raise HyperparameterError(
                        f"method 'combined': {self.owner[slot].name} and {part.name} both fill the {slot!r} slot; "
                        "combine only methods whose slots do not overlap"
                    )
                self.owner[slot] = part
        self.slots = frozenset(self.owner)
        self.budget_dependent = any(getattr(p, "budget_dependent", False) for p in self.parts)  # as its parts
        # The weights are scaled as their part says, and the EMA warm-up applies unless the EMA's part says not.
        if "weighting" in self.owner:
            self.weight_scale = self.owner["weighting"].weight_scale
        if "ema" in self.owner:
            self.ema_warmup = self.owner["ema"].ema_warmup
        for part in self.parts:
            for k, v in part.hp.items():
                self.hp[f"{part.name}.{k}"] = v

    def non_default_params(self):
        out = {"parts": self.hp["parts"]} if self.hp["parts"] != self.params["parts"].default else {}
        for part in self.parts:
            out.update({f"{part.name}.{k}": v for k, v in part.non_default_params().items()})
        return out

    def timestep_probs(self, p, schedule):
        return self.owner["timesteps"].timestep_probs(p, schedule)

    def sample_timesteps(self, u, p, schedule):
        return self.owner["timesteps"].sample_timesteps(u, p, schedule)

    def loss_weights(self, t, p, schedule, target):
        return self.owner["weighting"].loss_weights(t, p, schedule, target)

    def optimizer(self, p):
        return self.owner["optimizer"].optimizer(p)

    def ema_decay(self, p, base, step):
        return ema_decay_at(self.owner["ema"], p, base, step)

    def track_ema(self, step, model):
        self.owner["ema"].track_ema(step, model)

    def ema_snapshot(self, step):
        return self.owner["ema"].ema_snapshot(step)

    def stream_seed(self, seed):
        return self.owner["streams"].stream_seed(seed)

    def assign_noise(self, x0, eps):
        return self.owner["noise"].assign_noise(x0, eps)

    def observe(self, t, losses):
        self.owner["feedback"].observe(t, losses)

    def build_aux(self, model, image_shape, dataset, data_dir):
        return self.owner["aux_loss"].build_aux(model, image_shape, dataset, data_dir)

    def aux_loss(self, aux, activation, x0):
        return self.owner["aux_loss"].aux_loss(aux, activation, x0)

    def state_dict(self):
        return {part.name: part.state_dict() for part in self.parts}

    def load_state_dict(self, state):
        for part in self.parts:
            part.load_state_dict(state.get(part.name, {}))
