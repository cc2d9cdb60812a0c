"""Evaluation: the batched log-likelihood core, metrics, task loaders, scorers, reports."""
