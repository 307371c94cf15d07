"""Loading saved models to score them: full checkpoints, PEFT adapters on their base model, tokenizers and configs.

What ``ctx-callback scan``, ``probe`` and ``audit`` load, usable without the command line: :class:`ModelLoader`
loads a full checkpoint or a PEFT adapter (keeping one base model to swap adapters on) and refuses weights that do
not match the model (:func:`check_loading_info`); :func:`adapter_base`, :func:`has_tokenizer`, :func:`load_tokenizer`,
:func:`load_model_config` and :func:`max_positions_of` find and load what goes with a checkpoint. Weights saved from
a ``torch.compile``d model load like any other (:data:`~ctx_callback.checkpoints.COMPILED_KEY_MAPPING`). Every name
or path may be the offline SmolLM2 alias (:func:`~ctx_callback.models.resolve_model_path`).

Bad input raises :class:`~ctx_callback.errors.ModelLoadError` or
:class:`~ctx_callback.errors.CheckpointMismatchError`. Module-level imports stay free of torch and transformers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from .checkpoints import COMPILED_KEY_MAPPING
from .errors import CheckpointMismatchError, ModelLoadError, quote_error
from .models import max_positions, resolve_model_path

__all__ = [
    "TOKENIZER_FILES",
    "ModelLoader",
    "adapter_base",
    "check_loading_info",
    "has_tokenizer",
    "load_model_config",
    "load_tokenizer",
    "max_positions_of",
]

#: Files of which any one makes a directory a tokenizer directory.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(path: Path) -> bool:
    """Whether ``path`` is a directory holding tokenizer files (:data:`TOKENIZER_FILES`)."""
    return path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES)


def adapter_base(path: Path, override: str | None = None, *,
                 hint: str = "pass the base model (ModelLoader's base_override)") -> str | None:
    """The base model of a PEFT adapter directory (``override`` wins), or ``None`` when ``path`` is no adapter.

    Args:
        path: A checkpoint directory.
        override: The base model to use instead of the one ``adapter_config.json`` names.
        hint: How the message says to give the base model when the config names none.

    Raises:
        ModelLoadError: The adapter config is unreadable, or names no base model (and no ``override`` is given).
    """
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        return None
    if override:
        return override
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"unreadable {config_file}: {quote_error(err)}") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{config_file} names no base_model_name_or_path; {hint}")
    return str(base)


def load_tokenizer(source: str) -> Any:
    """``AutoTokenizer.from_pretrained(source)`` (a directory, a Hub id or the SmolLM2 alias).

    Raises:
        ModelLoadError: ``could not load a tokenizer from SOURCE (ErrorType: message)``.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(source))
    except Exception as err:  # noqa: BLE001 - reported as bad input
        raise ModelLoadError(f"could not load a tokenizer from {source!r} ({type(err).__name__}: "
                             f"{quote_error(err)})") from None


def load_model_config(source: str, name: str | None = None) -> Any:
    """The config of the model ``source`` names (a directory, a Hub id or the SmolLM2 alias).

    Loading the config first (it is small) tells a missing model from a missing tokenizer.

    Args:
        source: What to load the config from.
        name: How the message names the model (default: ``repr(source)``).

    Raises:
        ModelLoadError: ``could not load model NAME: ...`` when ``source`` is neither a model directory nor a loadable
            Hub id.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_path(source))
    except Exception as err:  # noqa: BLE001 - reported as bad input
        label = name if name is not None else repr(source)
        raise ModelLoadError(f"could not load model {label}: {type(err).__name__}: {quote_error(err)}") from None


def max_positions_of(source: str | None) -> int | None:
    """The maximum length of the model ``source`` names (what the callback passes to the scorer), or ``None`` when
    unknown (no source, or a config that does not load or does not say)."""
    if source is None:
        return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model_path(source))
    except Exception:  # noqa: BLE001 - only a length check: skip it
        return None
    return max_positions(config)


def _key_list(keys: Any) -> str:
    names = sorted(k[0] if isinstance(k, tuple) else str(k) for k in keys)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_loading_info(name: str, info: dict[str, Any]) -> None:
    """Raise when ``from_pretrained(..., output_loading_info=True)`` left weights missing, unexpected or resized.

    transformers initialises missing weights randomly and only logs it; scoring such a model measures noise. Tied
    weights (``lm_head.weight`` with ``tie_word_embeddings=True``) are not missing: transformers leaves them out.

    Raises:
        CheckpointMismatchError: Naming up to five keys of each kind.
    """
    parts = [f"{label} {_key_list(info.get(key) or ())}"
             for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                                ("mismatched_keys", "wrong shape"))
             if info.get(key)]
    if parts:
        raise CheckpointMismatchError(
            f"checkpoint {name} does not match the model its config describes (scoring it would measure randomly "
            "initialised weights): " + "; ".join(parts))


class ModelLoader:
    """Loads full checkpoints and PEFT adapters; keeps one base model around to swap adapters on it.

    Weights must match the model exactly (a :class:`~ctx_callback.errors.CheckpointMismatchError` otherwise); the
    ``_orig_mod.`` prefix of weights saved from a ``torch.compile``d model is removed first.

    Args:
        dtype: The weights' torch dtype.
        device: The torch device to put the model on.
        base_override: PEFT adapters: the base model to apply them to, instead of the one their config names.
    """

    def __init__(self, dtype: Any, device: str, base_override: str | None = None) -> None:
        self.dtype = dtype
        self.device = device
        self.base_override = base_override
        self._base_name: str | None = None
        self._base: Any = None

    def base_model_of(self, path: Path) -> str | None:
        """The base model of the adapter directory ``path``, or ``None`` for a full checkpoint (see
        :func:`adapter_base`)."""
        return adapter_base(path, self.base_override)

    def _from_pretrained(self, name: str) -> Any:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress line per checkpoint is enough

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # no load-report table: a mismatch is raised below, naming the keys
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecation chatter between library versions
                model, info = AutoModelForCausalLM.from_pretrained(
                    resolve_model_path(name), dtype=self.dtype, output_loading_info=True,
                    key_mapping=COMPILED_KEY_MAPPING)
        finally:
            hf_logging.set_verbosity(verbosity)
        check_loading_info(name, info)
        return model.to(self.device).eval()

    def load(self, path: str) -> tuple[Any, str]:
        """``(model, kind)`` where kind is ``"full"`` or ``"peft"``. Call :meth:`release` after scoring.

        Raises:
            ModelLoadError: A broken adapter config (see :func:`adapter_base`).
            CheckpointMismatchError: The weights do not match the model's config.
            OSError: ``path`` is not a model directory or loadable Hub id (transformers' error).
        """
        local = Path(path)
        base = self.base_model_of(local) if local.is_dir() else None
        if base is None:
            return self._from_pretrained(path), "full"
        from peft import PeftModel

        if self._base is None or self._base_name != base:
            self._base = None
            self._base = self._from_pretrained(base)
            self._base_name = base
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(self._base, path, is_trainable=False)
        except Exception:
            self._base = None  # the base may hold half-injected adapter layers: reload it next time
            raise
        return model.to(self.device).eval(), "peft"

    def release(self, model: Any, kind: str) -> None:
        """Undo an adapter so the cached base model is clean for the next one (reload it if that fails)."""
        if kind != "peft":
            return
        try:
            self._base = model.unload()
        except Exception:  # noqa: BLE001 - correctness first: reload the base next time
            self._base = None
