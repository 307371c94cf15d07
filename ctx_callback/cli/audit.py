"""``ctx-callback audit DATA --model M``: find the training examples that teach a model to ignore its context.

Scores every example of DATA with and without its context (the callback's engines), categorises it
(:mod:`ctx_callback.audit.rules`), prints a summary table and writes into ``--output-dir``:

- ``audit.jsonl``: one record per example (category, NLL with/without context, context gain, token counts);
- ``audit_summary.json``: counts and shares per category, the rule, the cut-off, the settings;
- ``audit_hist.png``: histogram of the rule's statistic by category, the cut-off marked (needs matplotlib);
- ``audit_scores.jsonl``: the raw scores, appended chunk by chunk: a killed audit run again with the same settings
  scores only what is missing (``--rescore`` starts over).

``--out FILE`` writes the dataset without the non-context-critical examples (every column kept); ``--augment F``
writes the dataset plus ``F x rows`` counterfactual copies to ``--augmented-out`` (see
:mod:`ctx_callback.audit.mitigate`). Both are written in the format their extension names (:data:`OUTPUT_FORMATS`):

- ``.jsonl`` / ``.json`` (JSON lines / one JSON list): from a ``.jsonl``/``.json`` input every row is written exactly
  as it was in the input, with the keys it had (a key some rows lack is not added to them);
- ``.csv`` / ``.parquet``: one table, every row with every column (a column a row lacks is an empty cell / null);
  nested columns (``messages``) cannot go into a CSV and are refused.

An output that is the input file, or inside the input folder, is refused unless ``--overwrite`` is given. Bad options
(an unknown extension, an unwritable path, ``--augment`` out of range) and bad data (missing columns, empty targets,
a bad format) exit 2 before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .common import (
    EXIT_OK,
    PROBE_DTYPE_CHOICES,
    WEIGHT_DTYPES,
    ModelLoader,
    add_debug_option,
    add_subparser,
    eprint,
    load_model_config,
    load_tokenizer,
    one_line,
    positive_float,
    positive_int,
    resolve_device,
    torch_dtype,
    warn,
)

__all__ = ["AUDIT_HIST", "AUDIT_JSONL", "AUDIT_SCORES", "AUDIT_SUMMARY", "NAME", "OUTPUT_FORMATS", "add_parser",
           "run"]

NAME = "audit"

AUDIT_JSONL = "audit.jsonl"
AUDIT_SUMMARY = "audit_summary.json"
AUDIT_HIST = "audit_hist.png"
AUDIT_SCORES = "audit_scores.jsonl"
#: The file types ``--out`` and ``--augmented-out`` write, by extension.
OUTPUT_FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def _field(text: str) -> tuple[str, str]:
    role, sep, column = text.partition("=")
    if not sep or not role.strip() or not column.strip():
        raise argparse.ArgumentTypeError(f"expected ROLE=COLUMN (e.g. context=passage), got {text!r}")
    return role.strip(), column.strip()


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``audit`` and its options.

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``audit`` subparser.
    """
    from ..audit.adapters import AUDIT_FORMATS
    from ..audit.rules import RULES, STATISTICS

    parser = add_subparser(
        subparsers, NAME,
        help="audit SFT data: which examples are non-context-critical; filter or augment it",
        description="Score every example of DATA with and without its context, categorise it (context_critical, "
                    "non_context_critical, parametric), print a summary table and write "
                    f"{AUDIT_JSONL}, {AUDIT_SUMMARY} and {AUDIT_HIST}; optionally the filtered (--out) and the "
                    "augmented (--augment) dataset. Resumable: a re-run with the same settings scores only the "
                    f"examples not yet in {AUDIT_SCORES}.",
    )
    parser.add_argument("data", metavar="DATA",
                        help="a .json/.jsonl/.csv/.parquet file, a dataset folder, or a Hub dataset id")
    parser.add_argument("--model", default=None, metavar="PATH|ID",
                        help="the model to audit with (a directory, a Hub id or smollm2-135m-instruct); required")
    g = parser.add_argument_group("data options")
    g.add_argument("--format", dest="data_format", default="auto",
                   choices=["auto", *[name for name in AUDIT_FORMATS if name != "split"]],
                   help="where the context is; auto detects it from the columns")
    g.add_argument("--field", dest="fields", action="append", type=_field, default=[], metavar="ROLE=COLUMN",
                   help="a renamed column, e.g. --field context=passage (repeatable)")
    g.add_argument("--split", dest="data_split", default="train", help="dataset split (folders and Hub ids)")
    g.add_argument("--skip-invalid", action="store_true",
                   help="warn about examples with an empty target and audit the rest (default: an error)")
    g.add_argument("--prompt-format", default=None, metavar="FORMAT",
                   help="how training renders prompts: chat, alpaca, tulu, plain or a template with {context} and "
                        "{question}; default: alpaca for Alpaca data, else chat")
    g.add_argument("--system-prompt", default=None,
                   help="chat format: the system message of your training data, for the examples without a system "
                        "turn of their own (a messages example is rendered with its own)")
    g.add_argument("--max-target-tokens", type=positive_int, default=64, metavar="N",
                   help="score the first N tokens of each target")
    g = parser.add_argument_group("rule options")
    g.add_argument("--rule", choices=list(RULES), default="default",
                   help="default: lowest 25%% of the summed no-context NLL; paper: lowest 25%% of the mean per-token "
                        "no-context NLL (perplexity)")
    g.add_argument("--statistic", choices=list(STATISTICS), default=None, help="override the rule's statistic")
    g.add_argument("--quantile", type=_share, default=None, metavar="Q",
                   help="flag the lowest Q of context examples (default 0.25)")
    g.add_argument("--threshold", type=float, default=None, metavar="X",
                   help="flag context examples whose statistic is <= X instead of a quantile")
    g = parser.add_argument_group("outputs")
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where the audit files go; default: audit_<DATA name> in the current directory")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="write the filtered dataset, in the format of its extension: " + ", ".join(OUTPUT_FORMATS))
    g.add_argument("--overwrite", action="store_true",
                   help="let --out / --augmented-out be the input file (or a file in the input folder): replaces it")
    g.add_argument("--augment", type=positive_float, default=None, metavar="F",
                   help="write the dataset plus F x rows counterfactual copies (e.g. 0.1; at most 10)")
    g.add_argument("--augmented-out", default=None, metavar="FILE",
                   help="where --augment writes (same formats as --out); default: DIR/augmented.jsonl")
    g.add_argument("--seed", type=int, default=0, help="seed of --augment")
    g.add_argument("--rescore", action="store_true", help=f"ignore {AUDIT_SCORES} and score every example")
    g.add_argument("--no-plot", action="store_true", help=f"do not draw {AUDIT_HIST}")
    g = parser.add_argument_group("model options")
    g.add_argument("--dtype", choices=WEIGHT_DTYPES, default="float32", help="weights dtype")
    g.add_argument("--probe-dtype", choices=PROBE_DTYPE_CHOICES, default=None,
                   help="run the forward passes under torch.autocast in this dtype (weights left in --dtype)")
    g.add_argument("--device", default=None, help="torch device; default: cuda if available, else cpu")
    g.add_argument("--batch-tokens", type=positive_int, default=8192, metavar="N", help="padded tokens per forward")
    g.add_argument("--tokenizer", default=None, metavar="PATH|ID", help="default: the model's")
    add_debug_option(parser)
    return parser


def _check_output(option: str, text: str, data: str, overwrite: bool) -> Path:
    """Refuse an output path before the audit: an unknown extension, a folder, the input, an unwritable place.

    Returns:
        The path, ``~`` expanded.

    Raises:
        UsageError: The message names ``option`` and the path as the user gave it, and how to fix it.
    """
    path = Path(text).expanduser()
    if path.is_dir():
        raise UsageError(f"{option} {text} is a folder; name a file, e.g. {os.path.join(text, 'filtered.jsonl')}.")
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        named = f"the extension {suffix!r} names no format" if suffix else "a name without an extension names no format"
        raise UsageError(f"{option} {text}: {named} this command writes; end the file name in one of "
                         f"{', '.join(OUTPUT_FORMATS)} (the file is written in the format its extension names).")
    source = Path(data).expanduser()
    if not overwrite and source.exists():
        target = path.resolve()
        if source.is_dir() and source.resolve() in target.parents:
            raise UsageError(f"{option} {text} is inside the input dataset folder {data}: the folder would then hold "
                             "it as training data too (a folder is read as every data file in it). Write it outside "
                             "the folder, or pass --overwrite to write there on purpose.")
        if source.is_file() and (target == source.resolve() or (path.exists() and os.path.samefile(path, source))):
            raise UsageError(f"{option} {text} is the input data file {data}: writing there would replace your "
                             "training data. Write to another file, or pass --overwrite to replace it on purpose.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{option} {text}: cannot write there: {folder} is a file, not a folder. Pick another path.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"{option} {text}: cannot write in {folder} ({err.strerror or err}). Pick a writable "
                         "path.") from None
    return path


def _check_csv(option: str, text: str, rows: Any) -> None:
    """Refuse a ``.csv`` output for data with nested columns (a CSV cell holds no list of messages)."""
    import datasets

    features = getattr(rows, "features", None) or {}
    nested = [name for name, feature in features.items()
              if not isinstance(feature, (datasets.Value, datasets.ClassLabel))]
    if nested:
        raise UsageError(f"{option} {text}: the column(s) {nested} hold lists or records, which a CSV file cannot "
                         "hold. Write .jsonl, .json or .parquet instead.")


def _raw_records(data: str, rows: Any, result: Any) -> list[dict[str, Any]] | None:
    """The rows of a ``.jsonl``/``.json`` input exactly as in the file (the keys each has, no ``None`` fill-in), or
    ``None`` (another input, or a file whose records do not line up with what the loader read)."""
    from ..audit import row_keys

    path = Path(data).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        return None
    text = path.read_text(encoding="utf-8")
    try:
        loaded = json.loads(text)
        records = loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    if len(records) != len(rows) or not all(isinstance(record, dict) for record in records):
        return None
    keys = [record.get("row_key") for record in result.records]
    if row_keys(records, result.settings.get("key_columns") or []) != keys:
        return None
    return records


def _write_rows(path: Path, rows: Any) -> None:
    """Write ``rows`` (a ``datasets.Dataset`` or a list of dicts) atomically, in the format of ``path``'s extension."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            lines = [json.dumps(dict(rows[i]), default=str, ensure_ascii=False) for i in range(len(rows))]
            with open(tmp, "w", encoding="utf-8") as f:
                if suffix == ".jsonl":
                    f.writelines(line + "\n" for line in lines)
                else:
                    f.write("[\n" + ",\n".join(lines) + "\n]\n")
        else:
            table = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))
            if suffix == ".csv":
                table.to_csv(str(tmp), index=False)
            else:
                table.to_parquet(str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    """Run ``ctx-callback audit``.

    Args:
        args: The parsed command line.

    Returns:
        ``EXIT_OK``.

    Raises:
        CtxCallbackError: Bad input (missing data, columns, empty targets, an unloadable model, ...).
    """
    from ..audit import audit_dataset, load_audit_data, prepare_examples

    if not args.model:
        raise UsageError("audit needs the model to score the data with: --model PATH|ID (the model you fine-tune)")
    data_name = Path(args.data.rstrip("/")).name or "data"
    out_dir = Path(args.output_dir).expanduser() if args.output_dir else Path(f"audit_{Path(data_name).stem}")
    fields = dict(args.fields)
    # Bad options are reported before the data is read, bad data before any model is loaded.
    outputs = _check_outputs(args, out_dir)
    rows = load_audit_data(args.data, split=args.data_split)
    for option, (text, path) in outputs.items():
        if path.suffix.lower() == ".csv":
            _check_csv(option, text, rows)
    invalid = "skip" if args.skip_invalid else "error"
    prepare_examples(rows, data_format=args.data_format, fields=fields, invalid=invalid)
    model, tokenizer = _load_model(args, len(rows))
    out_dir.mkdir(parents=True, exist_ok=True)
    scores_path = out_dir / AUDIT_SCORES
    if args.rescore and scores_path.exists():
        scores_path.unlink()
    result = audit_dataset(
        rows, model, tokenizer, data_format=args.data_format, fields=fields, prompt_format=args.prompt_format,
        system_prompt=args.system_prompt, rule=args.rule, statistic=args.statistic, quantile=args.quantile,
        threshold=args.threshold, max_target_tokens=args.max_target_tokens, probe_dtype=args.probe_dtype,
        max_batch_tokens=args.batch_tokens, invalid=invalid, resume_file=scores_path, progress=True,
    )
    cached = len(rows) - result.scored_now - result.counts().get("invalid", 0)
    rate = result.scored_now / result.seconds if result.seconds > 0 else float("nan")
    eprint(f"scored {result.scored_now} examples in {result.seconds:.1f}s ({rate:.1f} examples/s), {cached} from "
           f"{scores_path.name}")
    print(result.table())
    written = _write_audit_files(args, result, out_dir)
    written += _write_datasets(args, outputs, rows, result, fields)
    print("wrote " + ", ".join(written))
    return EXIT_OK


def _check_outputs(args: argparse.Namespace, out_dir: Path) -> dict[str, tuple[str, Path]]:
    """The dataset outputs asked for, checked before the data is read: ``{option: (as given, path)}``.

    Raises:
        UsageError: ``--augment`` out of range, an output that cannot be written, is the input, or is one of the
            audit's own files, or ``--out`` and ``--augmented-out`` naming the same file.
    """
    from ..audit.mitigate import MAX_FRACTION

    if args.augment is not None and args.augment > MAX_FRACTION:
        raise UsageError(f"--augment {args.augment:g}: the counterfactual copies are a share of the rows, at most "
                         f"{MAX_FRACTION:g} (0.1 adds 10% more rows); pass a value between 0 and {MAX_FRACTION:g}.")
    outputs: dict[str, tuple[str, Path]] = {}
    if args.out:
        outputs["--out"] = (args.out, _check_output("--out", args.out, args.data, args.overwrite))
    if args.augment is not None:
        text = args.augmented_out or str(out_dir / "augmented.jsonl")
        outputs["--augmented-out"] = (text, _check_output("--augmented-out", text, args.data, args.overwrite))
    if len(outputs) == 2 and outputs["--out"][1].resolve() == outputs["--augmented-out"][1].resolve():
        raise UsageError(f"--out {args.out} and --augmented-out name the same file; give them different names.")
    own_files = {(out_dir / name).resolve() for name in (AUDIT_JSONL, AUDIT_SUMMARY, AUDIT_HIST, AUDIT_SCORES)}
    for option, (text, path) in outputs.items():
        if path.resolve() in own_files:
            raise UsageError(f"{option} {text} is one of the files the audit itself writes in {out_dir}; pick "
                             "another name.")
    return outputs


def _load_model(args: argparse.Namespace, rows: int) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model`` (its config first: a missing model is reported as such).

    Raises:
        UsageError: The model, its config or its tokenizer does not load.
    """
    device = resolve_device(args.device)
    load_model_config(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    loader = ModelLoader(torch_dtype(args.dtype), device)
    start = time.perf_counter()
    try:
        model, _ = loader.load(args.model)
    except OSError as err:
        raise UsageError(f"could not load model {args.model!r}: {one_line(err)}") from None
    eprint(f"loaded {args.model} in {time.perf_counter() - start:.1f}s; auditing {rows} examples")
    return model, tokenizer


def _write_audit_files(args: argparse.Namespace, result: Any, out_dir: Path) -> list[str]:
    """Write the audit's own files (records, summary, histogram) into ``out_dir``; returns what was written."""
    summary = result.summary
    summary["data"] = args.data
    result.to_jsonl(out_dir / AUDIT_JSONL)
    (out_dir / AUDIT_SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    written = [str(out_dir / AUDIT_JSONL), str(out_dir / AUDIT_SUMMARY)]
    if not args.no_plot:
        try:
            written.append(result.plot_histogram(out_dir / AUDIT_HIST))
        except ImportError:
            warn(f"matplotlib is not installed: no {AUDIT_HIST} (pip install 'ctx_callback[plot]')")
    if summary["too_long"]:
        warn(f"{summary['too_long']} example(s) do not fit the model and were not scored (category too_long, kept "
             f"by --out): {summary['too_long_indices']}")
    return written


def _write_datasets(args: argparse.Namespace, outputs: dict[str, tuple[str, Path]], rows: Any, result: Any,
                    fields: dict[str, str]) -> list[str]:
    """Write ``--out`` (the filtered dataset) and ``--augmented-out``; returns what was written."""
    from ..audit import augment_dataset, filter_dataset

    # JSON outputs get the input's own records (each with exactly its keys); tables get the loaded dataset.
    raw = None
    if any(path.suffix.lower() in (".jsonl", ".json") for _, path in outputs.values()):
        raw = _raw_records(args.data, rows, result)
        if raw is None and Path(args.data).expanduser().suffix.lower() in (".jsonl", ".json"):
            warn(f"could not line up the records of {args.data} with the rows the loader read: JSON outputs are "
                 "written as the loader read the rows (a key some rows lack is null in them)")

    def source_for(path: Path) -> Any:
        return raw if raw is not None and path.suffix.lower() in (".jsonl", ".json") else rows

    written = []
    if "--out" in outputs:
        text, path = outputs["--out"]
        filtered = filter_dataset(source_for(path), result)
        _write_rows(path, filtered)
        written.append(f"{text} ({len(filtered)} of {len(rows)} rows)")
    if "--augmented-out" in outputs:
        text, path = outputs["--augmented-out"]
        augmented = augment_dataset(source_for(path), fraction=args.augment, seed=args.seed,
                                    data_format=args.data_format, fields=fields)
        _write_rows(path, augmented)
        written.append(f"{text} ({len(augmented) - len(rows)} counterfactual rows added)")
    return written
