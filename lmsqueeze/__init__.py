"""lmsqueeze: compress large language models fast, then measure what compression did."""
__version__ = "0.1.0"

from lmsqueeze.errors import LmsqueezeError  # noqa: E402

__all__ = ["LmsqueezeError", "__version__"]


def evaluate(*args, **kwargs):
    """Run evaluation tasks on a model (see lmsqueeze.evaluation.api.evaluate); imported lazily."""
    from lmsqueeze.evaluation.api import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ += ["evaluate"]
_COMPRESSOR = ("compress", "save_compressed", "load_compressed", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig",
               "GPTQConfig", "RTNConfig", "AWQConfig", "NF4Config", "LLMInt8Config", "CompressionReport")
__all__ += list(_COMPRESSOR)


def __getattr__(name):
    # lazy: `import lmsqueeze` stays light (no torch/transformers) until the compressor is used
    if name in _COMPRESSOR:
        import lmsqueeze.compressor as _c

        return getattr(_c, name)
    if name.endswith("Config"):  # the config of any registered method (LMSQUEEZE_METHODS plug-ins too)
        from lmsqueeze.compressor.methods import registry

        for method in registry().values():
            if method.config.__name__ == name:
                return method.config
    raise AttributeError(f"module 'lmsqueeze' has no attribute {name!r}")
