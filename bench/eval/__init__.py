"""Evaluation: the evaluation spec, samplers, FID/KID through Inception, the shipped proxy feature
extractor and its weights, and the hook the training loop calls (evaluate)."""
