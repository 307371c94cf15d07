"""Package-level behaviour: lazy imports keep `import ctx_callback` and the CLI's --help free of torch."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_lazy_and_names_resolve():
    code = ("import sys, ctx_callback; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
            "from ctx_callback import load_probes, PeakTracker; assert 'torch' not in sys.modules; "
            "from ctx_callback import ProbeScorer, ContextRelianceCallback; assert 'torch' in sys.modules; "
            "assert set(ctx_callback.__all__) <= set(dir(ctx_callback))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_does_not_load_torch():
    code = ("import sys\nfrom ctx_callback.cli import main\n"
            "try:\n    main(['scan', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_unknown_attribute():
    import pytest

    import ctx_callback

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ctx_callback.nope  # noqa: B018
