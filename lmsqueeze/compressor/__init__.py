"""Compression: per-layer method math, the sequential calibration driver, save and load."""
from lmsqueeze.compressor.config import (
                                         GPTQConfig,
                                         MagnitudeConfig,
                                         RTNConfig,
                                         SparseGPTConfig,
                                         WandaConfig,
                                         from_dict,
                                         make_config,
)
from lmsqueeze.compressor.driver import CompressionReport, compress
from lmsqueeze.compressor.methods.awq import AWQConfig
from lmsqueeze.compressor.methods.llm_int8 import LLMInt8Config
from lmsqueeze.compressor.methods.nf4 import NF4Config
from lmsqueeze.compressor.save import load_compressed, save_compressed

__all__ = ["AWQConfig", "CompressionReport", "GPTQConfig", "LLMInt8Config", "NF4Config", "MagnitudeConfig", "RTNConfig", "SparseGPTConfig", "WandaConfig",
           "compress", "from_dict", "load_compressed", "make_config", "save_compressed"]
