"""cbs: measure the critical batch size of pre-training and how it scales with data and model size.

    cbs.pipeline  the training side (torch, deepspeed, megatron-core): preprocess, pretrain, evaluate, studies
    cbs.analysis  pure-Python statistics (fits, laws, forecasts, figures, the notebook API); never imports torch
    cbs.batching  how a global batch splits over ranks and micro-batches (stdlib only; both sides use it)

This file imports nothing, so that `import cbs.analysis` stays light on a laptop without torch.
"""

__version__ = "0.1.0"
