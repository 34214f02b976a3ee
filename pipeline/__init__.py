"""cbs: measure the critical batch size of pre-training and how it scales with data and model size."""

__version__ = "0.1.0"
