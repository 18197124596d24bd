"""wan-tune: fine-tune Wan video diffusion transformers on your own footage."""

__version__ = "0.1.0"
