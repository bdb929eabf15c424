from bench.core.spec import Method, Param


class Placebo(Method):
    """The baseline on other random numbers: a control, not an acceleration method.

    Same initialisation, data order and flips as the baseline's seed k, but its timestep and noise
    streams are drawn from another seed (seed + 1,000,000 x `offset`, far from any suite's seeds).
    Nothing about training changes, so every difference from the baseline is noise: its
    speed-up intervals should cover 1, and its final-difference intervals 0, at about the nominal
    rate. A suite that lists it shows what its own seeds and metric give by chance.
    """

    name = "placebo"
    slots = frozenset({"streams"})
    params = {"offset": Param(1, "which re-seeded stream set (1, 2, ...)", low=1)}
    source = "the suite's control (METHODS.md, \"Placebo\"): the baseline with re-seeded timestep and noise streams"

    def stream_seed(self, seed: int) -> int:
        return seed + 1_000_000 * self.hp["offset"]
