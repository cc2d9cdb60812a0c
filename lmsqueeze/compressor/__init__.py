"""Compression: per-layer method math, the sequential calibration driver, save and load."""
