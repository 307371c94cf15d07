"""The engines on a transformers without 2-D boolean ``logits_to_keep`` (5.16, which axolotl 0.19 pins; 5.6, which
LLaMA-Factory 0.9.5 pins): they pass the 1-D positions kept in any row and select each row's answer positions
themselves, with the same scores.

On those releases this path runs for real in ``tests/test_axolotl.py`` and ``tests/test_llamafactory.py`` (opt-in;
docs/axolotl.md, docs/integrations.md): there the boolean mask raised ``IndexError: too many indices for tensor of
dimension 3`` in ``LlamaForCausalLM.forward``, and every probe round was logged as failed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ctx_callback import ProbeScorer
from ctx_callback.engines import base as engines_base
from tests.helpers import LOGLIK_ATOL, make_tiny_llama


@pytest.mark.parametrize("supported", [True, False])
@pytest.mark.parametrize("engine", ["prefix", "batched"])
def test_engines_agree_with_the_reference_with_and_without_boolean_logits_to_keep(tokenizer, capital_probes,
                                                                                  monkeypatch, engine, supported):
    if supported and not engines_base.BOOLEAN_LOGITS_TO_KEEP:
        pytest.skip("this transformers cannot take a 2-D boolean logits_to_keep (the case the fallback is for)")
    model = make_tiny_llama(tokenizer, seed=4)
    reference = ProbeScorer(capital_probes, tokenizer, "chat", engine="simple").score_raw(model).scores
    monkeypatch.setattr(engines_base, "BOOLEAN_LOGITS_TO_KEEP", supported)
    passed = []
    model.register_forward_pre_hook(lambda module, args, kwargs: passed.append(kwargs.get("logits_to_keep")),
                                    with_kwargs=True)
    scores = ProbeScorer(capital_probes, tokenizer, "chat", engine=engine, max_batch_size=4).score_raw(model).scores
    np.testing.assert_allclose(scores, reference, atol=LOGLIK_ATOL, rtol=0)
    masks = [value for value in passed if isinstance(value, torch.Tensor)]
    if supported:
        assert masks and all(mask.dtype == torch.bool and mask.dim() == 2 for mask in masks)
    else:
        # positions (never a mask), a strict subset of the columns: the projection still skips the prompts
        assert masks and all(value.dtype == torch.long and value.dim() == 1 for value in masks)
