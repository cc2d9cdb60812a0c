"""The evaluation tasks, one module each; every module here is imported by the registry (`evaluation.task`)."""
