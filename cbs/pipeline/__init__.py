"""The training side of cbs (torch, deepspeed, megatron-core): configs, preprocess, pretrain, evaluate, studies."""
