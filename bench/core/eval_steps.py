"""When a run evaluates: one rule shared by the training loop, the runner's display and the
cost model (torch-free, so the dry run and the report can use it)."""


def evaluates(eval_spec: dict | None, eval_every: int) -> bool:
    """A run evaluates at all when it has an evaluation spec or an evaluation interval."""
    return bool(eval_spec) or bool(eval_every)


def is_eval_step(step: int, iters: int, eval_every: int, budget: int | None = None) -> bool:
    """Steps (1-based, after the update) at which an evaluating run evaluates: every `eval_every`
    iterations, at the end of the run, and at the workload's budget (`budget`, where an extended
    baseline trains past it)."""
    return bool(eval_every and step % eval_every == 0) or step == iters or step == budget


def eval_steps(iters: int, eval_every: int, budget: int | None = None) -> list[int]:
    """Every evaluation step of an evaluating run, in order."""
    steps = list(range(eval_every, iters + 1, eval_every)) if eval_every else []
    if not steps or steps[-1] != iters:
        steps.append(iters)
    if budget and budget < iters and budget not in steps:
        steps = sorted([*steps, budget])
    return steps


def noise_sets_at(step: int, iters: int, budget: int | None, noise_sets: int) -> int:
    """How many noise sets an evaluation at `step` averages: `noise_sets` at the workload's budget
    and at every evaluation of an extended baseline (budget < iters: the headline reads its curve),
    else 1."""
    budget = budget or iters
    return noise_sets if step == budget or budget < iters else 1
