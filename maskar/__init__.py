"""maskar: coarse-to-fine masked autoregressive image generation (VAR, HMAR, MAR, CASMAR)."""

__version__ = "0.1.0"
