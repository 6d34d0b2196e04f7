"""Building the model (named random-init shape or from_pretrained checkpoint) on our attention."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from dynabatch.wire import models
from dynabatch.worker_svc.engine import attention, fusion


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(model: str, device: torch.device, dtype: torch.dtype,
               seed: int = 0) -> PreTrainedModel:
    """The causal LM in eval mode on `device`, its attention routed to the paged cache.

    Llama-family projections that share an input are fused (fusion.py). Named shapes are
    initialised under torch.manual_seed(seed) directly on the target device, so
    two processes with the same seed and device type build identical weights.
    """
    impl = attention.register()
    if models.is_named(model):
        config = models.load_config(model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            with torch.device(device):
                net = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                       attn_implementation=impl)
    else:
        net = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=impl)
        net.to(device)
    net.eval()
    net.requires_grad_(False)
    fusion.fuse_projections(net)
    return net
