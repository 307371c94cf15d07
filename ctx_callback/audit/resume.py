"""The audit's resume file: raw scores appended chunk by chunk, reused by a later audit with the same settings.

The first line is a header (:data:`AUDIT_SCORES_FORMAT` and the settings' fingerprint, which includes
:func:`model_signature`); every other line holds one example's raw scores under its :func:`score_key`. A file of
other settings is ignored (with a warning); a torn last line (a killed audit) is dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .adapters import AuditExample
from .scoring import example_key

__all__ = ["AUDIT_SCORES_FORMAT", "model_signature", "read_resume", "score_key", "start_resume"]

# The audit's logger: these records keep the name that users' logging configuration already knows.
logger = logging.getLogger("ctx_callback.audit.core")

#: Format tag of the resume file's header line.
AUDIT_SCORES_FORMAT = "ctx_callback.audit_scores/1"


def score_key(example: AuditExample) -> str:
    """The resume-file key of an example: :func:`~ctx_callback.audit.scoring.example_key`, with the example's own
    system prompt folded in when it has one (the key of an example without one is the same as before)."""
    key = example_key(example)
    if example.system is None:
        return key
    return hashlib.sha1(json.dumps([key, example.system]).encode()).hexdigest()[:16]


def model_signature(model: Any) -> str:
    """A cheap digest of the weights (a few values of every parameter) and the model's name and dtype."""
    import torch

    digest = hashlib.sha1()
    config = getattr(model, "config", None)
    digest.update(str(getattr(config, "_name_or_path", type(model).__name__)).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            digest.update(name.encode())
            digest.update(f"{param.dtype}{tuple(param.shape)}{float(flat[:64].double().sum()):.10e}"
                          f"{float(flat[-64:].double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


def read_resume(path: Path, fingerprint: str) -> dict[str, dict[str, Any]]:
    """The cached rows of ``path`` by key; ``{}`` when it is missing, not a resume file, or of other settings."""
    if not path.is_file():
        return {}
    cached: dict[str, dict[str, Any]] = {}
    with open(path) as f:
        header = f.readline()
        try:
            meta = json.loads(header)
        except json.JSONDecodeError:
            return {}
        if not isinstance(meta, dict) or meta.get("format") != AUDIT_SCORES_FORMAT:
            return {}
        if meta.get("fingerprint") != fingerprint:
            logger.warning("ctx_callback audit: %s holds scores of other settings (model, prompt format, target "
                           "cut or precision); scoring everything again.", path)
            return {}
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off when the audit was killed: that example is scored again
            if isinstance(row, dict) and "key" in row:
                cached[row["key"]] = row
    return cached


def start_resume(path: Path, fingerprint: str, cached: Mapping[str, Mapping[str, Any]]) -> Any:
    """Rewrite the resume file with only the cached rows still valid (dropping a torn last line), open it to append."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"format": AUDIT_SCORES_FORMAT, "fingerprint": fingerprint}) + "\n")
        for row in cached.values():
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return open(path, "a")


# ----------------------------------------------------------------------------------------------------------------
