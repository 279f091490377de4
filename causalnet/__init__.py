"""causalnet: neural networks as structural causal models."""

__version__ = "0.1.0"
