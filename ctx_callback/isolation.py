"""Probe hygiene: a probe round leaves the model and every random number generator exactly as it found them."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["probe_mode"]


@contextlib.contextmanager
def probe_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode + ``no_grad`` for a probe; restore each module's mode and all RNG states afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, was_training in modes:
            module.training = was_training
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
