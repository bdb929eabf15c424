"""When a run evaluates: one rule shared by the training loop, the runner's display and the
cost model (torch-free, so the dry run and the report can use it)."""


def evaluates(eval_spec: dict | None, eval_every: int) -> bool:
    """A run evaluates at all when it has an evaluation spec or an evaluation interval."""
    return bool(eval_spec) or bool(eval_every)


def is_eval_step(step: int, iters: int, eval_every: int) -> bool:
    """Steps (1-based, after the update) at which an evaluating run evaluates: every `eval_every`
    iterations and at the end of the budget."""
    return bool(eval_every and step % eval_every == 0) or step == iters


def eval_steps(iters: int, eval_every: int) -> list[int]:
    """Every evaluation step of an evaluating run, in order."""
    steps = list(range(eval_every, iters + 1, eval_every)) if eval_every else []
    if not steps or steps[-1] != iters:
        steps.append(iters)
    return steps
