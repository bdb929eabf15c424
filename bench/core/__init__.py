"""The core every other package builds on (torch, no bench package below it): the method plugin
contract (spec) and its registry, the diffusion process, a run's settings (config), what a method does
at a given progress (describe), when a run evaluates (eval_steps), and where it runs (runtime, perf)."""
