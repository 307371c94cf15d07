"""Probe precision: run a probe round under autocast in a lower dtype, the weights untouched.

``probe_dtype=None`` (the default everywhere) probes in the dtype the training step uses; ``"bfloat16"`` (or
``"float16"``, CUDA only) runs the forward passes under ``torch.autocast`` in that dtype. :func:`resolve_probe_dtype`
validates the option, :func:`check_probe_dtype_device` checks it against the model's device (and warns, once per
process, where bf16 is emulated and slow), :func:`probe_autocast` is the context a round runs under.
"""

from __future__ import annotations

import contextlib
import platform
import warnings
from typing import Any

import torch

from .engines.base import device_of
from .errors import ConfigurationError

__all__ = ["PROBE_DTYPES", "check_probe_dtype_device", "cpu_has_native_bf16", "probe_autocast",
           "resolve_probe_dtype"]

#: What ``probe_dtype`` accepts besides ``None`` (the dtype the training step uses), and the torch dtype of each.
PROBE_DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_probe_dtype(probe_dtype: Any) -> str | None:
    """Validate a ``probe_dtype`` option and return its canonical name.

    Args:
        probe_dtype: ``None`` (probe in the dtype the training step uses: the model as given, under the Trainer's
            autocast if any), ``"bfloat16"`` or ``"float16"`` (or the matching ``torch.dtype``): probe under
            ``torch.autocast(device_type, dtype=...)``, the weights left as they are.

    Returns:
        ``None``, ``"bfloat16"`` or ``"float16"``.

    Warns:
        UserWarning: ``"bfloat16"`` without CUDA on a CPU without native bf16 (see :func:`cpu_has_native_bf16`), once
            per process: there it is 3-4x slower than float32.

    Raises:
        ConfigurationError: Any other value, or ``"float16"`` where CUDA is not available (float16 autocast is
            supported on CUDA only here: on CPU it is slow and overflows where bfloat16 does not).
    """
    if probe_dtype is None:
        return None
    if isinstance(probe_dtype, torch.dtype):
        names = {dtype: name for name, dtype in PROBE_DTYPES.items()}
        name = names.get(probe_dtype)
    else:
        name = probe_dtype if isinstance(probe_dtype, str) and probe_dtype in PROBE_DTYPES else None
    if name is None:
        raise ConfigurationError(
            f"probe_dtype must be None (the dtype the training step uses) or one of {list(PROBE_DTYPES)}, got "
            f"{probe_dtype!r}. It sets the autocast dtype of the probe forward passes; the weights are not cast."
        )
    if name == "float16" and not torch.cuda.is_available():
        raise ConfigurationError(
            'probe_dtype="float16" needs a CUDA device (float16 autocast is not supported for probing on CPU); '
            'use probe_dtype="bfloat16" on CPU, or None.'
        )
    if name == "bfloat16" and not torch.cuda.is_available():  # the model will run on this CPU: say so up front
        _warn_if_bf16_is_emulated(name, "cpu")
    return name


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 matrix products natively, as torch dispatches them here.

    x86: the CPU has AVX-512 BF16 or AMX *and* torch runs its AVX-512 kernels
    (``torch.backends.cpu.get_cpu_capability()`` starts with ``"AVX512"``; ``ATEN_CPU_CAPABILITY=avx2`` turns them
    off). Other architectures: ``None`` (unknown; no claim is made).

    Returns:
        ``True``, ``False``, or ``None`` where it cannot be told.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return None
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    cpu = getattr(torch, "cpu", None)
    has_bf16 = any(bool(getattr(cpu, probe, lambda: False)())
                   for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return capability.startswith("AVX512") and has_bf16


#: Capabilities already warned about (the warning is given once per process).
_WARNED_SLOW_BF16: set[str] = set()


def _warn_if_bf16_is_emulated(probe_dtype: str | None, device_type: str) -> None:
    if probe_dtype != "bfloat16" or device_type != "cpu" or cpu_has_native_bf16() is not False:
        return
    capability = str(torch.backends.cpu.get_cpu_capability())
    if capability in _WARNED_SLOW_BF16:
        return
    _WARNED_SLOW_BF16.add(capability)
    warnings.warn(
        f'probe_dtype="bfloat16" on a CPU without native bfloat16 (torch CPU capability {capability}; no AVX-512 BF16 '
        "or AMX in use): bf16 autocast is emulated here and is SLOWER than float32, not faster (measured 3-4x slower "
        "on an AVX2-only AMD EPYC: SmolLM2-135M, 16 x 128 tokens, 13-20 s in float32, 59-66 s under bf16 autocast). "
        "Use probe_dtype=None (the default) on this machine; bfloat16 pays off on CPUs with AVX-512 BF16 / AMX and "
        "on GPUs.",
        UserWarning,
        stacklevel=2,
    )


def check_probe_dtype_device(probe_dtype: str | None, device: torch.device | str) -> None:
    """Raise when ``probe_dtype`` cannot run on ``device`` (float16 off CUDA; no autocast for the device type).

    Also warns, once per process, when ``"bfloat16"`` is asked for on a CPU without native bf16 (see
    :func:`cpu_has_native_bf16`): there bf16 autocast is 3-4x slower than float32.

    Raises:
        ConfigurationError: Naming the dtype and the device.
    """
    if probe_dtype is None:
        return
    device_type = torch.device(device).type
    _warn_if_bf16_is_emulated(probe_dtype, device_type)
    if probe_dtype == "float16" and device_type != "cuda":
        raise ConfigurationError(
            f'probe_dtype="float16" is supported on CUDA only, but the model is on {device_type!r}; use '
            'probe_dtype="bfloat16" (native on CPUs with AVX-512 BF16 / AMX) or None.'
        )
    if not torch.amp.is_autocast_available(device_type):
        raise ConfigurationError(
            f"probe_dtype={probe_dtype!r}: torch has no autocast for device type {device_type!r}; use None."
        )


def probe_autocast(model: torch.nn.Module, probe_dtype: str | None) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast(<model's device type>, dtype=probe_dtype)``, or a no-op context for ``None``.

    Under autocast, matrix multiplications run in ``probe_dtype`` on bf16/fp16 copies of the weights (cached for the
    context's duration: about half an fp32 model's size, freed on exit); the parameters are never modified. Where the
    model's forward wraps itself in the Trainer's own autocast (``bf16=True``/``fp16=True`` training), that inner
    autocast takes precedence, so the round runs in the training precision anyway.

    Raises:
        ConfigurationError: See :func:`check_probe_dtype_device`.
    """
    if probe_dtype is None:
        return contextlib.nullcontext()
    device = device_of(model)
    check_probe_dtype_device(probe_dtype, device)
    return torch.autocast(device.type, dtype=PROBE_DTYPES[probe_dtype])
