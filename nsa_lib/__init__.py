"""Spectra-NSA: train, watch, evaluate and ship sentence encoders with spectral-entropy attention.

The public names (SPEC section 8):
    NSAConfig, NSAModel, SpectralEntropyAttention, load_seed_checkpoint, encode,
    estimate_parameters, estimate_training_memory, NSALoss, temperature_at
"""
from .attention import SpectralEntropyAttention
from .config import PRESETS, NSAConfig, estimate_parameters, estimate_training_memory
from .losses import LossOutput, NSALoss, temperature_at
from .model import NSAModel, encode, load_seed_checkpoint

__version__ = "0.2.0.dev0"

__all__ = ["NSAConfig", "NSAModel", "encode", "SpectralEntropyAttention", "load_seed_checkpoint", "NSALoss", "LossOutput",
           "temperature_at", "PRESETS", "estimate_parameters",
           "estimate_training_memory", "__version__"]
