"""Before/after harness for refactors under issue 19's rule: what the callback and the CLI write stays byte-identical.

Issue 19's refactor may move code around but must not change a byte of what the callback
(:class:`ctx_callback.ContextRelianceCallback`) and ``ctx-callback`` write (timings aside). This script runs a fixed set
of small, deterministic scenarios (tiny random Llamas from :mod:`tests.helpers`, the SmolLM2 tokenizer, a few SFT steps
each, on CPU) and dumps, per scenario, a normalised copy of everything they produced into ``OUT_DIR/NAME``:

* ``output/...``: every text file of the run's ``output_dir`` (summary, probe log, checkpoints' ``trainer_state.json``,
  configs, the CLI's scan/audit files), JSON re-dumped with ``sort_keys`` and ``indent=1``, JSONL line by line;
* ``files.txt``: the manifest of every file produced: binary files (safetensors, ``.pt``, ``.bin``, tfevents) by name
  and size only, PNGs by name only (their bytes may embed metadata), large text files (tokenizer files) by size and
  SHA-256, and for each JSON/JSONL file the SHA-256 of its raw text with the timings masked (re-dumping with sorted
  keys hides a change of key order or layout; this hash does not);
* ``log_history.json`` (``trainer.state.log_history``), ``summary.json`` (``callback.summary(...)``) and
  ``console.txt`` (what the run printed, the ``ctx_callback`` loggers' records, the warnings ``ctx_callback`` issued);
* ``cli.txt`` for the command-line scenarios: each call's arguments, exit code, stdout and stderr.

Normalisation: keys naming a timing (containing ``seconds``, ``runtime``, ``per_second`` or ``wall``) are dropped from
JSON and masked in text; durations (``1.2s``), rates (``15.3 examples/s``) and tqdm's elapsed/remaining brackets are
masked, tqdm's intermediate ``\\r`` refreshes dropped (only a bar's final state is kept); the scan cache's weight-file
modification times and the audit's settings fingerprint (it hashes the model's temporary path) are masked; the
temporary work folder, the repository and the SmolLM2 folder are replaced by
``<OUT>``, ``<REPO>`` and ``<SMOLLM2>``; TensorBoard's time-and-host file and folder names are replaced. The script
re-executes itself with ``PYTHONHASHSEED=0`` so that no set or dict order can depend on string hashing.

How to use it, on ONE machine::

    git worktree add /tmp/ctx_before <commit before the change>
    .venv/bin/python tools/behaviour_dump.py /tmp/dump_before --repo /tmp/ctx_before   # the old code
    .venv/bin/python tools/behaviour_dump.py /tmp/dump_after                           # this checkout
    .venv/bin/python tools/behaviour_dump.py --compare /tmp/dump_before /tmp/dump_after

``--repo`` (default: the checkout holding this script) is the checkout whose ``ctx_callback`` and ``tests`` package
are imported, so the script itself need not exist in the old commit. ``--compare`` prints the first differing file and
line of each scenario and exits 1 on any difference, 0 when the dumps are identical. ``--only NAME ...`` runs a subset
(``--list`` names them; ``ddp``, a two-process ``torch.distributed.run`` launch, runs only when named). Compare dumps of
the same scenarios.

Floats differ across CPUs (another instruction set or thread count changes float32 summation order, hence scores,
losses and even which step a run stops at), so dumps are only comparable when made on the same machine; the script
uses one torch thread. The whole default set takes a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_REPO = Path(__file__).resolve().parent.parent

#: Substrings of keys whose values are timings (dropped from JSON, masked in printed dicts).
TIMING_PARTS = ("seconds", "runtime", "per_second", "wall")
#: Text files larger than this are recorded by size and SHA-256 only (the tokenizer files of every checkpoint).
LARGE_TEXT = 256 * 1024
#: Suffixes recorded by name and size only.
BINARY_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npy", ".npz", ".pkl", ".parquet", ".arrow", ".gguf")

_TIMING_KEY = r"[^\"'\n]*(?:" + "|".join(TIMING_PARTS) + r")[^\"'\n]*"
_NUMBER = r"-?(?:\d[\d.eE+-]*|NaN|nan|-?Infinity|inf)"
RE_JSON_TIMING = re.compile(r'("' + _TIMING_KEY + r'"\s*:\s*)(?:' + _NUMBER + r'|null|"[^"]*")')
RE_PRINTED_TIMING = re.compile(r"('" + _TIMING_KEY + r"':\s*)(?:'[^']*'|" + _NUMBER + r")")
RE_MTIME = re.compile(r'(\[\s*"[^"\n]+",\s*\d+,\s*)\d+(\s*\])')
#: The audit's settings fingerprint hashes the tokenizer's path (a temporary folder here): masked.
RE_FINGERPRINT = re.compile(r'("fingerprint"\s*:\s*)"[0-9a-f]+"')
RE_TQDM = re.compile(r"\[\d+:\d\d(?::\d\d)?(?:<[^\]\n]*)?(?:,[^\]\n]*)?\]")
RE_SECONDS = re.compile(r"\b\d+\.\d+ ?s\b")
RE_SECONDS_WORD = re.compile(r"\b\d+(?:\.\d+)? ?(?:seconds|secs?)\b")
RE_RATE = re.compile(r"\b(?:\d+(?:\.\d+)?|nan|inf)( ?)(examples|ex|it|steps|samples)/s\b")
RE_TFEVENTS = re.compile(r"events\.out\.tfevents\.[^/]+")
RE_RUNS = re.compile(r"(^|/)runs/[A-Z][a-z]{2}\d\d_\d\d-\d\d-\d\d_[^/]+")


# ----------------------------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------------------------


def is_timing_key(key: str) -> bool:
    """Whether a key names a timing.

    Args:
        key: A JSON or log key.

    Returns:
        True when the key contains one of :data:`TIMING_PARTS`.
    """
    lowered = key.lower()
    return any(part in lowered for part in TIMING_PARTS)


class Normaliser:
    """Replaces machine- and run-specific strings (paths, timings) by placeholders.

    Args:
        replacements: ``(path, placeholder)`` pairs; longer paths are replaced first.
    """

    def __init__(self, replacements: Sequence[tuple[str, str]]):
        pairs: dict[str, str] = {}
        for path, placeholder in replacements:
            for variant in {path, os.path.realpath(path)}:
                if variant and variant != os.sep:
                    pairs[variant] = placeholder
        self.pairs = sorted(pairs.items(), key=lambda item: -len(item[0]))

    def paths(self, text: str) -> str:
        """Replace the known absolute paths.

        Args:
            text: Any text.

        Returns:
            The text with each known path replaced by its placeholder, and TensorBoard's run folder names (a time and
            a host name) by ``runs/<RUN>``.
        """
        for path, placeholder in self.pairs:
            text = text.replace(path, placeholder)
        return RE_RUNS.sub(lambda m: m.group(1) + "runs/<RUN>", text)

    def relpath(self, rel: str) -> str:
        """Normalise a relative file name (TensorBoard names carry a time, a host name and a process id).

        Args:
            rel: A POSIX path relative to a dumped folder.

        Returns:
            The path with TensorBoard's run folder and event file names replaced.
        """
        rel = RE_RUNS.sub(lambda m: m.group(1) + "runs/<RUN>", rel)
        return RE_TFEVENTS.sub("events.out.tfevents.<ID>", rel)

    def text(self, text: str) -> str:
        """Normalise printed text: paths, tqdm refreshes, durations, rates and timing keys of printed dicts.

        Args:
            text: Captured stdout/stderr, a log, or a plain text file.

        Returns:
            The normalised text.
        """
        lines = []
        for line in text.split("\n"):
            if "\r" in line:  # a progress bar redrawn in place: only its final state is reproducible
                parts = [part for part in line.split("\r") if part.strip()]
                line = parts[-1] if parts else ""
            lines.append(line)
        text = self.paths("\n".join(lines))
        text = RE_PRINTED_TIMING.sub(r"\1'<T>'", text)
        text = RE_JSON_TIMING.sub(r"\1<T>", text)
        text = RE_TQDM.sub("[<T>]", text)
        text = RE_RATE.sub(r"<R>\1\2/s", text)
        text = RE_SECONDS_WORD.sub("<T> seconds", text)
        return RE_SECONDS.sub("<T>s", text)

    def raw_json_text(self, text: str) -> str:
        """Mask what varies in a JSON/JSONL file's own text, keeping its layout and key order.

        Args:
            text: The file's text.

        Returns:
            The text with paths replaced, timing values and the scan cache's modification times masked.
        """
        text = RE_JSON_TIMING.sub(r"\1<T>", self.paths(text))
        return RE_FINGERPRINT.sub(r'\1"<FINGERPRINT>"', RE_MTIME.sub(r"\1<MTIME>\2", text))

    def value(self, obj: Any, key: str | None = None) -> Any:
        """Normalise a JSON value: drop timing keys, mask modification times, replace paths in strings.

        Args:
            obj: A JSON-like value.
            key: The key ``obj`` is stored under, if any.

        Returns:
            The normalised value (a new object).
        """
        if isinstance(obj, dict):
            return {self.paths(str(k)): self.value(v, str(k)) for k, v in obj.items() if not is_timing_key(str(k))}
        if isinstance(obj, (list, tuple)):
            if key == "weights":  # the scan cache's weight signatures: [name, size, mtime_ns]
                return [[self.value(e[0]), e[1], "<MTIME>"] if isinstance(e, list) and len(e) == 3 else self.value(e)
                        for e in obj]
            return [self.value(v) for v in obj]
        if isinstance(obj, str):
            return "<FINGERPRINT>" if key == "fingerprint" else self.paths(obj)
        return obj


def dumps(obj: Any) -> str:
    """The dump format of JSON files: sorted keys, ``indent=1``, a final newline.

    Args:
        obj: A JSON-like value (NaN allowed).

    Returns:
        The JSON text.
    """
    return json.dumps(obj, sort_keys=True, indent=1, default=repr) + "\n"


def sha256(data: bytes) -> str:
    """SHA-256 hex digest.

    Args:
        data: Bytes to hash.

    Returns:
        The hex digest.
    """
    return hashlib.sha256(data).hexdigest()


def write_text(path: Path, text: str) -> None:
    """Write text exactly (no newline translation), creating parent folders.

    Args:
        path: Destination file.
        text: Its content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def _normalise_csv(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return text
    timing = [i for i, name in enumerate(rows[0]) if is_timing_key(name)]
    for row in rows[1:]:
        for i in timing:
            if i < len(row):
                row[i] = "<T>"
    out = io.StringIO(newline="")
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _tfevents_text(path: Path, norm: Normaliser) -> str | None:
    """A TensorBoard event file's events without their wall times: one line per value (step, tag, plugin, value).

    Args:
        path: The event file.
        norm: The normaliser (paths and run folder names in text summaries; timing tags masked).

    Returns:
        The lines, or ``None`` without tensorboard.
    """
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util
    except ImportError:
        return None
    lines = []
    for event in EventFileLoader(str(path)).Load():
        kind = event.WhichOneof("what")
        if kind != "summary":
            lines.append(f"step {event.step} {kind} {norm.paths(str(getattr(event, kind))).strip()}")
            continue
        for value in event.summary.value:
            which = value.WhichOneof("value")
            if which == "tensor":
                content: Any = tensor_util.make_ndarray(value.tensor).tolist()
            else:
                content = getattr(value, which)
            if is_timing_key(value.tag):
                content = "<T>"
            elif isinstance(content, float):
                content = repr(content)
            else:
                content = norm.paths(json.dumps(content, default=lambda b: b.decode("utf-8", "replace")))
            lines.append(f"step {event.step} {value.tag} [{value.metadata.plugin_data.plugin_name}] {content}")
    return "\n".join(lines) + "\n"


def dump_file(source: Path, dest: Path, norm: Normaliser) -> str:
    """Dump one produced file and say how it was recorded.

    Args:
        source: The produced file.
        dest: Where its normalised text goes (text files only).
        norm: The normaliser.

    Returns:
        The manifest entry (without the file name).
    """
    name = source.name
    size = source.stat().st_size
    if name.lower().endswith(".png"):
        return "png (name only)"
    if "tfevents" in name:
        events = _tfevents_text(source, norm)
        if events is None:
            return "tfevents (name only; tensorboard is not installed)"
        write_text(dest.with_name(dest.name + ".txt"), events)
        return f"tfevents (name only; its events, without wall times, in {dest.name}.txt)"
    if name.lower().endswith(BINARY_SUFFIXES):
        return f"binary {size} bytes"
    data = source.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return f"binary {size} bytes"
    if "\x00" in text:
        return f"binary {size} bytes"
    if size > LARGE_TEXT:
        return f"text {size} bytes sha256={sha256(norm.paths(text).encode())}"
    raw = sha256(norm.raw_json_text(text).encode())[:16]
    if name.endswith(".json"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            write_text(dest, dumps(norm.value(parsed)))
            return f"json raw-sha256={raw}"
    if name.endswith(".jsonl"):
        out = []
        for line in text.splitlines():
            try:
                out.append(json.dumps(norm.value(json.loads(line)), sort_keys=True))
            except json.JSONDecodeError:
                out.append("UNPARSED " + norm.text(line))
        write_text(dest, "\n".join(out) + ("\n" if out else ""))
        return f"jsonl {len(out)} lines raw-sha256={raw}"
    if name.endswith(".csv"):
        write_text(dest, _normalise_csv(norm.paths(text)))
        return "csv"
    write_text(dest, norm.text(text))
    return "text"


def list_files(root: Path) -> list[str]:
    """Every file under a folder.

    Args:
        root: The folder.

    Returns:
        Sorted POSIX paths relative to ``root``.
    """
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def snapshot(root: Path) -> dict[str, str]:
    """Content hashes of every file under a folder (to find what a command wrote).

    Args:
        root: The folder.

    Returns:
        ``{relative path: sha256}``.
    """
    return {rel: sha256((root / rel).read_bytes()) for rel in list_files(root)}


def dump_tree(source: Path, dest: Path, norm: Normaliser, manifest: list[str], label: str,
              only: set[str] | None = None) -> None:
    """Dump the files of a folder (or the listed ones) into ``dest`` and the manifest.

    Args:
        source: The produced folder.
        dest: The dump folder for its files.
        norm: The normaliser.
        manifest: Manifest lines to append to.
        label: Prefix of this folder's entries in the manifest.
        only: Relative paths to dump; ``None`` dumps all.
    """
    for rel in list_files(source):
        if only is not None and rel not in only:
            continue
        rel_n = norm.relpath(rel)
        manifest.append(f"{label}/{rel_n}: {dump_file(source / rel, dest / rel_n, norm)}")


# ----------------------------------------------------------------------------------------------------------------
# Capturing what a run or a command prints
# ----------------------------------------------------------------------------------------------------------------


class _ListHandler(logging.Handler):
    def __init__(self, records: list[str]):
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.levelname} {record.name}: {record.getMessage()}")


class Capture:
    """Captures stdout, stderr, the ``ctx_callback`` loggers (INFO and above) and ``ctx_callback``'s warnings."""

    def __init__(self) -> None:
        self.stdout, self.stderr = io.StringIO(), io.StringIO()
        self.records: list[str] = []
        self.warnings: list[str] = []
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Capture:
        logger = logging.getLogger("ctx_callback")
        handler = _ListHandler(self.records)
        level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        self._stack.callback(logger.setLevel, level)
        self._stack.callback(logger.removeHandler, handler)
        caught = self._stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        self._stack.callback(self._keep_warnings, caught)
        self._stack.enter_context(contextlib.redirect_stdout(self.stdout))
        self._stack.enter_context(contextlib.redirect_stderr(self.stderr))
        return self

    def _keep_warnings(self, caught: list[warnings.WarningMessage]) -> None:
        package = os.sep + "ctx_callback" + os.sep
        for w in caught:
            message = str(w.message)
            if package in str(w.filename) or "ctx_callback" in message or "ctx-callback" in message:
                self.warnings.append(f"{w.category.__name__}: {message}")

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def text(self, norm: Normaliser) -> str:
        """Everything captured, normalised.

        Args:
            norm: The normaliser.

        Returns:
            stdout, stderr, log records and warnings under headings.
        """
        parts = [("stdout", self.stdout.getvalue()), ("stderr", self.stderr.getvalue()),
                 ("log", "\n".join(self.records)), ("warnings", "\n".join(self.warnings))]
        return "".join(f"--- {name}\n{norm.text(body).rstrip()}\n" for name, body in parts)


# ----------------------------------------------------------------------------------------------------------------
# Probes and data of the scenarios
# ----------------------------------------------------------------------------------------------------------------

#: Six phrasings of the capital question (as in tests/test_stop_rules_training.py): 42 probes, enough for a paired test.
QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital city of {c}.",
             "What city is {c}'s capital?", "Tell me the capital of {c}.", "{c} has which capital?"]
#: (country, true capital, counterfactual city, two more options), as in tests/test_multiple_choice.py.
MC_CAPITALS = [("France", "Paris", "Lyon", "Marseille", "Nice"), ("Japan", "Tokyo", "Osaka", "Kyoto", "Nagoya"),
               ("Italy", "Rome", "Milan", "Naples", "Turin"), ("Germany", "Berlin", "Munich", "Hamburg", "Cologne")]
#: The options of tests/test_callback.py::rise_and_fall_run.
RISE_AND_FALL = dict(eval_steps=2, monitor="counterfactual_probability", patience=2, warmup_steps=4,
                     save_peak_checkpoint=True, restore_peak_at_end=True, variants=("context", "closed_book"))
RISE_AND_FALL_TRAINER = dict(max_steps=30, save_strategy="steps", save_steps=5, save_total_limit=1)


def phrased_probes() -> list[dict[str, Any]]:
    """The seven capital conflicts in six phrasings (42 probes).

    Returns:
        Probe records.
    """
    from tests.helpers import CAPITALS

    return [{"id": f"capitals/{country.lower()}-{q}", "family": "capitals",
             "context": f"The capital of {country} is {fake}.", "question": question.format(c=country),
             "counterfactual_answer": fake, "parametric_answer": true}
            for q, question in enumerate(QUESTIONS) for country, true, fake in CAPITALS]


def mc_records(with_parametric: bool = True, family: str = "mc", list_options: bool = False) -> list[dict[str, Any]]:
    """Four-way multiple-choice capital probes, the answers at different positions.

    Args:
        with_parametric: Name the true capital as the parametric answer.
        family: Probe family.
        list_options: Show the options in the prompt.

    Returns:
        Probe records.
    """
    rows = []
    for i, (country, true, fake, a, b) in enumerate(MC_CAPITALS):
        options = [true, fake, a, b]
        options = options[i % 4:] + options[: i % 4]
        row = {"id": f"{family}/{country.lower()}", "family": family,
               "context": f"The capital of {country} is {fake}.", "question": f"What is the capital of {country}?",
               "counterfactual_answer": fake, "options": options, "list_options": list_options}
        if with_parametric:
            row["parametric_answer"] = true
        rows.append(row)
    return rows


def alpaca_rows() -> list[dict[str, Any]]:
    """Audit training data (as in tests/test_audit_cli.py): supporting, conflicting and closed-book examples.

    Returns:
        Alpaca records.
    """
    from tests.helpers import CAPITALS

    rows = []
    for country, true, fake in CAPITALS:
        question = f"What is the capital of {country}?"
        rows.append({"instruction": question, "input": f"The capital of {country} is {true}.", "output": true,
                     "lang": "en"})
        rows.append({"instruction": question, "input": f"The capital of {country} is {fake}.", "output": fake,
                     "lang": "en"})
        rows.append({"instruction": question, "input": "", "output": true, "lang": "en"})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The harness
# ----------------------------------------------------------------------------------------------------------------


class Harness:
    """Runs scenarios in a temporary work folder and dumps them into ``out``.

    Args:
        out: The dump folder.
        work: The temporary work folder (replaced by ``<OUT>``).
        repo: The checkout whose code runs (replaced by ``<REPO>``).
    """

    def __init__(self, out: Path, work: Path, repo: Path):
        from ctx_callback.models import smollm2_path

        self.out, self.work, self.repo = out, work, repo
        self.smollm2 = str(smollm2_path())
        self.norm = Normaliser([(str(work), "<OUT>"), (str(repo), "<REPO>"), (self.smollm2, "<SMOLLM2>")])
        self._tokenizer: Any = None
        self._patience_dir: Path | None = None
        self.outcomes: dict[str, str] = {}

    @property
    def tokenizer(self) -> Any:
        """The SmolLM2 tokenizer (loaded once)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.smollm2)
        return self._tokenizer

    # -- training runs --------------------------------------------------------------------------------------------
    def train(self, output_dir: Path, probes: Any, *, seed: int = 0, dataset: Any = None, resume: str | None = None,
              extra_callbacks: Sequence[Any] = (), trainer_kwargs: dict[str, Any] | None = None,
              **callback_kwargs: Any) -> tuple[Any, Any, Capture]:
        """One tiny SFT run with the callback (``tests.helpers.make_trainer``'s defaults).

        Args:
            output_dir: The trainer's output directory.
            probes: The callback's probes.
            seed: Seed of the tiny Llama.
            dataset: Training data; ``None``: the rise-and-fall conflict data.
            resume: ``resume_from_checkpoint``.
            extra_callbacks: Callbacks added after the one under test.
            trainer_kwargs: ``SFTConfig`` overrides.
            **callback_kwargs: ``ContextRelianceCallback`` options.

        Returns:
            The trainer, the callback and what the run printed.
        """
        from ctx_callback import ContextRelianceCallback
        from tests.helpers import make_tiny_llama, make_trainer

        model = make_tiny_llama(self.tokenizer, seed=seed)
        trainer = make_trainer(model, self.tokenizer, output_dir, dataset=dataset, **(trainer_kwargs or {}))
        with Capture() as captured:
            callback = ContextRelianceCallback(trainer, probes, **callback_kwargs)
            trainer.add_callback(callback)
            for extra in extra_callbacks:
                trainer.add_callback(extra)
            trainer.train(resume_from_checkpoint=resume)
        return trainer, callback, captured

    def dump_run(self, dest: Path, output_dir: Path, trainer: Any, callback: Any, captured: Capture) -> str:
        """Dump a training run: its output folder, log history, summary and console.

        Args:
            dest: The scenario's dump folder (or a subfolder).
            output_dir: The run's output directory.
            trainer: The trainer.
            callback: The callback.
            captured: What the run printed.

        Returns:
            A one-line description of the run's outcome (for the terminal, not the dump).
        """
        manifest: list[str] = []
        dump_tree(output_dir, dest / "output", self.norm, manifest, "output")
        write_text(dest / "files.txt", "\n".join(manifest) + "\n")
        write_text(dest / "log_history.json", dumps(self.norm.value(trainer.state.log_history)))
        summary: Any = None
        if hasattr(callback, "summary"):
            summary = callback.summary(restored=bool(getattr(callback, "last_restored", False)))
        write_text(dest / "summary.json", dumps(self.norm.value(summary)))
        write_text(dest / "console.txt", captured.text(self.norm))
        s = summary or {}
        return (f"global_step={trainer.state.global_step} stop_step={s.get('stop_step')} "
                f"stop_rule={s.get('stop_rule')} peak_step={s.get('peak_step')} restored_from="
                f"{self.norm.paths(str(s.get('restored_from')))} probe_events={s.get('probe_events')}")

    def run_and_dump(self, name: str, probes: Any, **kwargs: Any) -> str:
        """Train into ``work/NAME`` and dump it into ``out/NAME``.

        Args:
            name: Scenario name.
            probes: The callback's probes.
            **kwargs: :meth:`train`'s options.

        Returns:
            :meth:`dump_run`'s description.
        """
        output_dir = self.work / name
        trainer, callback, captured = self.train(output_dir, probes, **kwargs)
        return self.dump_run(self.out / name, output_dir, trainer, callback, captured)

    def patience_run(self, output_dir: Path) -> tuple[Any, Any, Capture]:
        """The rise-and-fall run of tests/test_callback.py (patience stop, peak checkpoint, restore), plus a plot.

        Args:
            output_dir: The trainer's output directory.

        Returns:
            :meth:`train`'s result.
        """
        from tests.helpers import PROBES

        return self.train(output_dir, PROBES, trainer_kwargs=dict(RISE_AND_FALL_TRAINER), plot=True, **RISE_AND_FALL)

    def patience_dir(self) -> Path:
        """The patience run's output folder (run here, undumped, when the ``patience`` scenario did not run).

        Returns:
            The folder.
        """
        if self._patience_dir is None:
            self._patience_dir = self.work / "patience"
            self.patience_run(self._patience_dir)
        return self._patience_dir

    def probes_file(self) -> Path:
        """``tests.helpers.PROBES`` as a JSONL file, as the command line reads them.

        Returns:
            The file.
        """
        from tests.helpers import PROBES

        path = self.work / "capitals.jsonl"
        if not path.exists():
            write_text(path, "".join(json.dumps(record) + "\n" for record in PROBES))
        return path

    # -- command line -----------------------------------------------------------------------------------------------
    def cli(self, argv: Sequence[Any]) -> str:
        """Run ``ctx_callback.cli.main`` in process.

        Args:
            argv: The arguments (paths allowed).

        Returns:
            The call, its exit code, stdout, stderr, logs and warnings, normalised.
        """
        from ctx_callback.cli import main

        args = [str(a) for a in argv]
        with Capture() as captured:
            try:
                code: Any = main(args)
            except SystemExit as exit_:
                code = exit_.code
        header = self.norm.paths("$ ctx-callback " + " ".join(args))
        return f"{header}\nexit code: {code}\n{captured.text(self.norm)}\n"

    def dump_cli(self, name: str, calls: Sequence[Sequence[Any]], watched: Sequence[Path] = ()) -> str:
        """Run CLI calls, dump their transcripts into ``NAME/cli.txt`` and what they wrote under ``watched``.

        Args:
            name: Scenario name.
            calls: The argument lists, run in order.
            watched: Folders whose new or changed files are dumped (``NAME/output/<folder name>/...``).

        Returns:
            The exit codes, for the terminal.
        """
        dest = self.out / name
        before = {folder: snapshot(folder) for folder in watched}
        transcripts = [self.cli(call) for call in calls]
        write_text(dest / "cli.txt", "".join(transcripts))
        manifest: list[str] = []
        for folder in watched:
            after = snapshot(folder)
            written = {rel for rel, digest in after.items() if before[folder].get(rel) != digest}
            dump_tree(folder, dest / "output" / folder.name, self.norm, manifest, f"output/{folder.name}", written)
        write_text(dest / "files.txt", "\n".join(manifest) + ("\n" if manifest else ""))
        codes = re.findall(r"^exit code: (\S+)$", "".join(transcripts), flags=re.M)
        return "exit codes " + " ".join(codes)


# ----------------------------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------------------------


def scenario_patience(h: Harness) -> str:
    """tests/test_callback.py::rise_and_fall_run: eval_steps=2, patience=2, warmup 4, peak checkpoint, restore, plot."""
    h._patience_dir = h.work / "patience"
    trainer, callback, captured = h.patience_run(h._patience_dir)
    return h.dump_run(h.out / "patience", h._patience_dir, trainer, callback, captured)


def scenario_significant_decline(h: Harness) -> str:
    """tests/test_stop_rules_training.py's run: 42 phrased probes, stop_rule="significant_decline", TensorBoard."""
    return h.run_and_dump(
        "significant_decline", phrased_probes(), trainer_kwargs=dict(max_steps=40, report_to=["tensorboard"]),
        eval_steps=2, monitor="counterfactual_probability", stop_rule="significant_decline", min_decline=0.1,
        warmup_steps=4, variants=("context",))


def scenario_divergence(h: Harness) -> str:
    """The rise-and-fall run with divergence_threshold=0.05 instead of patience, no checkpoints."""
    from tests.helpers import PROBES

    return h.run_and_dump("divergence", PROBES, trainer_kwargs=dict(max_steps=30), eval_steps=2,
                          monitor="counterfactual_probability", divergence_threshold=0.05, warmup_steps=4,
                          variants=("context", "closed_book"))


def scenario_stopping_threshold(h: Harness) -> str:
    """Memory-only data (reliance falls from the baseline, about 0.29) and a floor of 0.19 below the baseline.

    The peak stays the baseline (step 0, never checkpointed), so restore_peak_at_end restores the in-memory copy.
    """
    from tests.helpers import PROBES, conflict_dataset

    return h.run_and_dump("stopping_threshold", PROBES, dataset=conflict_dataset(0, 15),
                          trainer_kwargs=dict(max_steps=12), eval_steps=2, monitor="counterfactual_probability",
                          stopping_threshold=0.19, warmup_steps=4, save_peak_checkpoint=True,
                          restore_peak_at_end=True, variants=("context", "closed_book"))


def scenario_resume(h: Harness) -> str:
    """The rise-and-fall run interrupted at step 14 (tests.helpers.StopAt), then resumed by a new trainer.

    Dumps ``interrupted/`` (the folder at the interruption, checkpoint-14/trainer_state.json included) and
    ``resumed/`` (the folder after the resumed run).
    """
    from tests.helpers import PROBES, StopAt

    output_dir, dest = h.work / "resume", h.out / "resume"
    options = dict(RISE_AND_FALL, restore_peak_at_end=False)
    first = h.train(output_dir, PROBES, extra_callbacks=[StopAt(14)], trainer_kwargs=dict(RISE_AND_FALL_TRAINER),
                    **options)
    interrupted = h.dump_run(dest / "interrupted", output_dir, *first)
    second = h.train(output_dir, PROBES, resume=str(output_dir / "checkpoint-14"),
                     trainer_kwargs=dict(RISE_AND_FALL_TRAINER), **options)
    return f"interrupted: {interrupted}; resumed: {h.dump_run(dest / 'resumed', output_dir, *second)}"


def scenario_known_only(h: Harness) -> str:
    """known_only=True on the seed-3 Llama, which knows some probes closed-book but not all."""
    from tests.helpers import PROBES

    return h.run_and_dump("known_only", PROBES, seed=3, trainer_kwargs=dict(max_steps=2), eval_steps=2,
                          known_only=True, variants=("context", "closed_book"))


def scenario_informative_band(h: Harness) -> str:
    """informative_band=(0.2, 0.8) on the 42 phrased probes."""
    return h.run_and_dump("informative_band", phrased_probes(), trainer_kwargs=dict(max_steps=2), eval_steps=2,
                          monitor="counterfactual_probability", informative_band=(0.2, 0.8), variants=("context",))


def scenario_generate(h: Harness) -> str:
    """mode="generate", max_new_tokens=3, all three variants."""
    from tests.helpers import PROBES

    return h.run_and_dump("generate", PROBES, trainer_kwargs=dict(max_steps=4), eval_steps=2, mode="generate",
                          max_new_tokens=3)


def scenario_multiple_choice(h: Harness) -> str:
    """Four-way multiple-choice probes mixed with two-answer ones, significant_decline, controls_every=4.

    Options listed in the prompt (with a parametric answer) and not listed (without one), probed at every step,
    saved every two steps.
    """
    from tests.helpers import capital_records, conflict_dataset

    probes = mc_records(list_options=True) + mc_records(False, "mc_nopar") + capital_records(4)
    return h.run_and_dump("multiple_choice", probes, dataset=conflict_dataset(1, 1),
                          trainer_kwargs=dict(max_steps=4, save_strategy="steps", save_steps=2), eval_steps=1,
                          stop_rule="significant_decline", controls_every=4)


def scenario_cli_help(h: Harness) -> str:
    """``--help`` of the command line and of every command, and ``--version`` (COLUMNS=120)."""
    commands = ["scan", "plot", "probe", "audit", "flips"]
    return h.dump_cli("cli_help", [["--help"], ["--version"], *[[c, "--help"] for c in commands]])


def _checkpoints(folder: Path) -> list[Path]:
    return sorted((p for p in folder.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]))


def scenario_scan(h: Harness) -> str:
    """``scan`` of a copy of the patience run's folder, then again (cached), then a missing folder (exit 2)."""
    run = h.work / "scan_run"
    shutil.copytree(h.patience_dir(), run)
    probes = h.probes_file()
    call = ["scan", run, "--probes", probes, "--variants", "context,closed_book"]
    return h.dump_cli("scan", [call, call, ["scan", h.work / "no_such_run", "--probes", probes]], [run])


def scenario_probe(h: Harness) -> str:
    """``probe`` of the patience run's first checkpoint, as a table and as JSON."""
    checkpoint = _checkpoints(h.patience_dir())[0]
    probes = h.probes_file()
    return h.dump_cli("probe", [["probe", checkpoint, "--probes", probes],
                                ["probe", checkpoint, "--probes", probes, "--json", "--variants", "context"]],
                      [h.patience_dir()])


def scenario_flips(h: Harness) -> str:
    """``flips`` of the patience run's probe log: peak to end, as JSON, baseline to step 14, a missing step."""
    run = h.patience_dir()
    return h.dump_cli("flips", [["flips", run], ["flips", run, "--json"], ["flips", run, "--from", "0", "--to", "14"],
                                ["flips", run, "--from", "0", "--to", "14", "--json"], ["flips", run, "--from", "1"]],
                      [run])


def scenario_plot(h: Harness) -> str:
    """``plot`` of the patience run's folder and of a checkpoint's trainer_state.json (PNG names only)."""
    run = h.patience_dir()
    plots = h.work / "plots"
    plots.mkdir(exist_ok=True)
    state = _checkpoints(run)[-1] / "trainer_state.json"
    return h.dump_cli("plot", [["plot", run, "-o", plots / "run.png"],
                               ["plot", state, "-o", plots / "state.png", "--monitor", "counterfactual_accuracy"],
                               ["plot", h.work / "no_such_run"]], [plots, run])


def scenario_audit(h: Harness) -> str:
    """``audit`` of a small Alpaca file with a tiny saved Llama (as tests/test_audit_cli.py), a re-run, bad input."""
    from tests.helpers import make_tiny_llama

    model_dir, data = h.work / "audit_model", h.work / "audit_data"
    make_tiny_llama(h.tokenizer, seed=5).save_pretrained(model_dir)
    h.tokenizer.save_pretrained(model_dir)
    data.mkdir()
    train = data / "train.jsonl"
    write_text(train, "".join(json.dumps(r) + "\n" for r in alpaca_rows()))
    out = h.work / "audit_out"
    out.mkdir()
    first = ["audit", train, "--model", model_dir, "--output-dir", out / "audit", "--quantile", "0.5", "--out",
             data / "filtered.jsonl", "--augment", "0.2", "--augmented-out", data / "augmented.jsonl"]
    again = ["audit", train, "--model", model_dir, "--output-dir", out / "audit", "--no-plot"]
    return h.dump_cli("audit", [first, again, ["audit", data / "missing.jsonl", "--model", model_dir]], [out, data])


def scenario_ddp(h: Harness) -> str:
    """Two processes (torch.distributed.run, gloo) with tests/workers/ddp_probe.py's ``loglik:replicated`` run."""
    out = h.work / "ddp"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(h.repo))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(h.repo / "tests" / "workers" / "ddp_probe.py"), h.smollm2, str(out),
           "loglik:replicated"]
    proc = subprocess.run(cmd, env=env, cwd=h.repo, capture_output=True, text=True, timeout=900)
    dest = h.out / "ddp"
    # The launcher's own output carries ports, process ids and timings: only the exit code is kept.
    write_text(dest / "launch.txt", f"exit code: {proc.returncode}\n")
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
    manifest: list[str] = []
    dump_tree(out, dest / "output", h.norm, manifest, "output")
    write_text(dest / "files.txt", "\n".join(manifest) + "\n")
    return f"exit code {proc.returncode}"


#: name -> (function, run by default). The CLI scenarios read the patience run (run undumped if not selected).
SCENARIOS: dict[str, tuple[Callable[[Harness], str], bool]] = {
    "patience": (scenario_patience, True),
    "significant_decline": (scenario_significant_decline, True),
    "divergence": (scenario_divergence, True),
    "stopping_threshold": (scenario_stopping_threshold, True),
    "resume": (scenario_resume, True),
    "known_only": (scenario_known_only, True),
    "informative_band": (scenario_informative_band, True),
    "generate": (scenario_generate, True),
    "multiple_choice": (scenario_multiple_choice, True),
    "cli_help": (scenario_cli_help, True),
    "scan": (scenario_scan, True),
    "probe": (scenario_probe, True),
    "flips": (scenario_flips, True),
    "plot": (scenario_plot, True),
    "audit": (scenario_audit, True),
    "ddp": (scenario_ddp, False),
}


# ----------------------------------------------------------------------------------------------------------------
# Dump and compare
# ----------------------------------------------------------------------------------------------------------------


def _prepare_environment(repo: Path) -> None:
    """Environment and import path, before anything imports torch, transformers or huggingface_hub."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["WANDB_MODE"] = "offline"
    os.environ["WANDB_SILENT"] = "true"
    os.environ["MPLBACKEND"] = "Agg"
    os.environ["COLUMNS"] = "120"  # argparse wraps --help to the terminal width
    os.environ["LINES"] = "50"
    sys.path.insert(0, str(repo))
    import torch

    torch.set_num_threads(1)
    import ctx_callback

    loaded = Path(ctx_callback.__file__).resolve()
    if repo not in loaded.parents:
        raise SystemExit(f"behaviour_dump: imported ctx_callback from {loaded}, not from --repo {repo}")


def dump(out: Path, names: Sequence[str], repo: Path) -> int:
    """Run the scenarios and write their dumps.

    Args:
        out: The dump folder (scenario folders in it are replaced).
        names: The scenarios, in :data:`SCENARIOS` order.
        repo: The checkout whose code runs.

    Returns:
        0, or 1 when a scenario raised (its ``error.txt`` says what).
    """
    _prepare_environment(repo)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctxdump-") as tmp:  # a fixed-length path: pickled paths keep their size
        harness = Harness(out, Path(tmp), repo)
        for name in names:
            shutil.rmtree(out / name, ignore_errors=True)
            began = time.perf_counter()
            try:
                outcome = SCENARIOS[name][0](harness)
            except Exception as err:  # noqa: BLE001 - a failing scenario is recorded, the others still run
                traceback.print_exc()
                write_text(out / name / "error.txt", harness.norm.text(f"{type(err).__name__}: {err}") + "\n")
                outcome, failed = f"FAILED ({type(err).__name__}: {err})", [*failed, name]
            print(f"[{name}] {time.perf_counter() - began:.1f}s {outcome}", flush=True)
    write_text(out / "scenarios.txt", "".join(f"{name}{' FAILED' if name in failed else ''}\n" for name in names))
    print(f"total {time.perf_counter() - start:.1f}s; dump in {out}", flush=True)
    return 1 if failed else 0


def _first_difference(a: Path, b: Path) -> str | None:
    lines_a = a.read_text(encoding="utf-8", errors="replace").splitlines()
    lines_b = b.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, (line_a, line_b) in enumerate(zip(lines_a, lines_b), start=1):
        if line_a != line_b:
            return f"line {number}:\n    A: {line_a[:300]}\n    B: {line_b[:300]}"
    if len(lines_a) != len(lines_b):
        return f"line counts {len(lines_a)} and {len(lines_b)} (one is a prefix of the other)"
    if a.read_bytes() != b.read_bytes():
        return "same lines, other bytes (line endings or a final newline)"
    return None


def compare(dir_a: Path, dir_b: Path) -> int:
    """Print the first difference of each scenario of two dumps.

    Args:
        dir_a: One dump.
        dir_b: The other.

    Returns:
        0 when identical, 1 otherwise.
    """
    files_a, files_b = set(list_files(dir_a)), set(list_files(dir_b))
    if not files_a and not files_b:
        print(f"nothing to compare: {dir_a} and {dir_b} hold no files")
        return 1
    groups = sorted({rel.split("/")[0] if "/" in rel else "." for rel in files_a | files_b})
    different = 0
    for group in groups:
        def members(files: set[str], group: str = group) -> list[str]:
            return sorted(r for r in files if (r.split("/")[0] if "/" in r else ".") == group)

        in_a, in_b = members(files_a), members(files_b)
        message = None
        only_a, only_b = sorted(set(in_a) - set(in_b)), sorted(set(in_b) - set(in_a))
        if only_a or only_b:
            message = (f"only in A: {only_a[:3]}{' ...' if len(only_a) > 3 else ''}; "
                       f"only in B: {only_b[:3]}{' ...' if len(only_b) > 3 else ''}")
        else:
            for rel in in_a:
                diff = _first_difference(dir_a / rel, dir_b / rel)
                if diff is not None:
                    message = f"{rel}: {diff}"
                    break
        if message is None:
            print(f"{group}: identical")
        else:
            different += 1
            print(f"{group}: DIFFERENT: {message}")
    print("identical" if not different else f"{different} of {len(groups)} differ")
    return 1 if different else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, help="folder to write the dump into")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="scenarios to run (default: all but ddp)")
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO,
                        help="checkout whose ctx_callback and tests run (default: the one holding this script)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("DIR_A", "DIR_B"), help="compare two dumps")
    parser.add_argument("--list", action="store_true", help="list the scenarios")
    args = parser.parse_args(argv)
    if args.list:
        for name, (function, default) in SCENARIOS.items():
            summary = (function.__doc__ or "").strip().splitlines()[0]
            print(f"{name:20s} {'' if default else '(only when named) '}{summary}")
        return 0
    if args.compare:
        return compare(*args.compare)
    if args.out_dir is None:
        parser.error("give OUT_DIR, --compare DIR_A DIR_B or --list")
    unknown = sorted(set(args.only or ()) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    names = [n for n, (_, default) in SCENARIOS.items() if (n in args.only if args.only else default)]
    if os.environ.get("PYTHONHASHSEED") != "0":  # string hashing decides set order: fix it, then start again
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)])
    return dump(args.out_dir.resolve(), names, args.repo.resolve())


if __name__ == "__main__":
    sys.exit(main())
