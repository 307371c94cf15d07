"""Probe-round speed: ctx_callback's engine against the naive loop, lm-evaluation-harness and a lower bound.

Times, in one process, on the same model and the same (prompt, continuation) requests:

(a) naive    one forward pass per (prompt, answer) pair (``ProbeScorer(engine="simple")``);
(b) lm-eval  ``lm_eval.models.huggingface.HFLM(pretrained=model, tokenizer=...).loglikelihood`` at its best batch
             size among ``--lm-eval-batch-sizes`` (optional: ``pip install -e .[bench]``);
(c) engine   ``ProbeScorer`` with its default engine (a shared-prefix KV cache, logits only at answer positions);
(d) bound    one forward pass over the unique tokens only: the shared preamble once, then each prompt's own tokens
             and both answers once, in batches of equal length (no padding), no output projection. Not a usable
             scorer: the floor any engine that reads every token once would hit.

Prints one table (median of ``--repeats`` timed runs after a warm-up): seconds per probe round, request tokens per
second, the ratios (c)/(a), (c)/(b), (c)/(d), and the largest absolute log-likelihood differences of (c) against
(a) (the simple unbatched computation) and against (b).

Probe cost options (issue 15), each timed side by side in the same process (the variants' runs interleaved, median of
``--repeats`` after a warm-up of each), after the table:

``--probe-dtype bfloat16``  the engine's round in the weights' dtype (``--dtype``, fp32 by default) against the same
                            round under ``torch.autocast(dtype=bfloat16)`` (``ProbeScorer(probe_dtype=...)``): the
                            speed-up, the lower bound (d) in both, and the bf16 scores' largest differences from fp32
                            (log-likelihood, per answer token, p_cf per probe, the ``counterfactual_probability``
                            metric, flipped preferences).
``--controls-every K,...``  a round of the context variant alone against a round with the controls (context,
                            closed_book, aligned; ``score_raw(..., variants=("context",))`` against all), and the
                            mean cost per probe event when the controls are scored on every K-th event only
                            (``(t_all + (K - 1) t_context) / K``), for K = 1 and each K given; in both dtypes when
                            ``--probe-dtype`` is given.

Usage::

    python benchmarks/probe_speed.py                    # SmolLM2-135M-Instruct fp32 on CPU, all built-in suites
    python benchmarks/probe_speed.py --tiny --repeats 1 # a tiny random Llama: a quick smoke run
    python benchmarks/probe_speed.py --device cuda --dtype bfloat16
    python benchmarks/probe_speed.py --skip a,b --probe-dtype bfloat16 --controls-every 3,5   # probe cost options
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict

import numpy as np
import torch

from ctx_callback import ProbeScorer, load_probes
from ctx_callback.encoding import ALL_VARIANTS
from ctx_callback.models import SMOLLM2_ALIAS, load_model_and_tokenizer
from ctx_callback.scoring import probe_autocast


def timed(fn, repeats: int):
    fn()  # warm-up (allocator, thread pools, lazy init)
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def timed_side_by_side(fns, repeats: int):
    """Median seconds and last result of each ``name -> fn``, the runs interleaved (a, b, a, b, ...) after one
    warm-up of each, so that a slow phase of the machine hits every variant alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    results = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, results


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def lower_bound(model, scorer, device):
    """(d): the shared preamble once, then every item's unique tokens once, padding-free, no output projection."""
    items = scorer.encoded.items
    p0 = len(scorer.encoded.shared_prefix)
    seqs = [list(it.prompt_ids[p0:]) + list(it.counterfactual_ids) + list(it.parametric_ids) for it in items]
    by_length = defaultdict(list)
    for seq in seqs:
        by_length[len(seq)].append(seq)
    budget = scorer.max_batch_tokens

    def run():
        with torch.no_grad():
            if p0:
                model(input_ids=torch.tensor([scorer.encoded.shared_prefix], device=device), use_cache=False,
                      logits_to_keep=1)
            for length, group in by_length.items():
                rows = max(1, budget // length)
                for i in range(0, len(group), rows):
                    ids = torch.tensor(group[i:i + rows], device=device)
                    model.model(input_ids=ids, use_cache=False)  # the decoder body only
            sync(device)

    return run, p0 + sum(len(s) for s in seqs)


def answer_lengths(scorer):
    """``[probes, variants, 2]`` answer token counts of a scorer's encoding (NaN where not encoded)."""
    lengths = np.full((len(scorer.probes), len(scorer.variants), 2), np.nan)
    for it in scorer.encoded.items:
        lengths[it.probe_index, scorer.variants.index(it.variant)] = (len(it.counterfactual_ids),
                                                                      len(it.parametric_ids))
    return lengths


def precision_report(model, probes, tokenizer, variants, args, device, base_name):
    """``--probe-dtype``: the engine's round (and the lower bound) in the weights' dtype and under autocast."""
    probe_dtype = args.probe_dtype
    base = ProbeScorer(probes, tokenizer, variants=variants, max_batch_tokens=args.batch_tokens)
    low = ProbeScorer(probes, tokenizer, variants=variants, max_batch_tokens=args.batch_tokens, probe_dtype=probe_dtype)

    def synced(fn):
        def run():
            out = fn()
            sync(device)
            return out
        return run

    fns = {base_name: synced(lambda: base.score(model)), probe_dtype: synced(lambda: low.score(model))}
    if "d" not in args.skip_set:
        floor, unique_tokens = lower_bound(model, base, device)

        def floor_low():
            with probe_autocast(model, probe_dtype):
                floor()

        fns[f"floor {base_name}"], fns[f"floor {probe_dtype}"] = floor, floor_low
    seconds, results = timed_side_by_side(fns, args.repeats)
    print()
    print(f"probe dtype, side by side (median of {args.repeats}, {variants}):")
    speedup = seconds[base_name] / seconds[probe_dtype]
    print(f"  engine round: {base_name} {seconds[base_name]:.2f} s, {probe_dtype} autocast "
          f"{seconds[probe_dtype]:.2f} s: {speedup:.2f}x faster ({probe_dtype}/{base_name} time ratio "
          f"{1 / speedup:.3f})")
    if f"floor {base_name}" in seconds:
        for name in (base_name, probe_dtype):
            print(f"  lower bound (d) in {name} ({unique_tokens} unique tokens): {seconds[f'floor {name}']:.2f} s; "
                  f"engine round / floor in {name}: {seconds[name] / seconds[f'floor {name}']:.2f}x")
    a, b = results[base_name], results[probe_dtype]
    delta = np.abs(a.result.scores - b.result.scores)
    per_token = delta / answer_lengths(base)
    ctx = base.variants.index("context")

    def p_cf(scores):
        return 1.0 / (1.0 + np.exp(-(scores[:, ctx, 0] - scores[:, ctx, 1])))

    margin_a = a.result.scores[..., 0] - a.result.scores[..., 1]
    margin_b = b.result.scores[..., 0] - b.result.scores[..., 1]
    valid = np.isfinite(margin_a) & np.isfinite(margin_b)
    flipped = int(np.sum((margin_a[valid] > 0) != (margin_b[valid] > 0)))
    key = "ctx_reliance/counterfactual_probability"
    print(f"  {probe_dtype} vs {base_name}: max |d loglik| {np.nanmax(delta):.4f} nats, per answer token max "
          f"{np.nanmax(per_token):.4f} (mean {np.nanmean(per_token):.4f}); max |d margin| "
          f"{np.nanmax(np.abs(margin_a - margin_b)):.4f}; max |d p_cf| per probe "
          f"{np.max(np.abs(p_cf(a.result.scores) - p_cf(b.result.scores))):.4f}; |d {key.split('/')[-1]}| "
          f"{abs(a.metrics[key] - b.metrics[key]):.2e}; preferences flipped {flipped}/{int(valid.sum())}")


def controls_report(model, probes, tokenizer, args, device, base_name):
    """``--controls-every``: a context-only round against a round with the controls, and the cost per event."""
    dtypes = [None] + ([args.probe_dtype] if args.probe_dtype else [])
    fns = {}
    for probe_dtype in dtypes:
        scorer = ProbeScorer(probes, tokenizer, variants=ALL_VARIANTS, max_batch_tokens=args.batch_tokens,
                             probe_dtype=probe_dtype)
        name = probe_dtype or base_name

        def context(scorer=scorer):
            out = scorer.score_raw(model, variants=("context",))
            sync(device)
            return out

        def everything(scorer=scorer):
            out = scorer.score_raw(model)
            sync(device)
            return out

        fns[(name, "context")], fns[(name, "all")] = context, everything
    seconds, _ = timed_side_by_side(fns, args.repeats)
    ks = sorted({1, *args.controls_every})
    print()
    print(f"controls_every, side by side (median of {args.repeats}; controls = closed_book, aligned):")
    for probe_dtype in dtypes:
        name = probe_dtype or base_name
        t_ctx, t_all = seconds[(name, "context")], seconds[(name, "all")]
        per_event = {k: (t_all + (k - 1) * t_ctx) / k for k in ks}
        print(f"  {name:9s} round: context only {t_ctx:.2f} s, context+controls {t_all:.2f} s "
              f"(controls {1 - t_ctx / t_all:.0%} of a full round); per event: "
              + ", ".join(f"K={k} {per_event[k]:.2f} s ({per_event[k] / per_event[1]:.2f}x of K=1)" for k in ks))


def int_list(text):
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers >= 1, got {text!r}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=SMOLLM2_ALIAS)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama with the SmolLM2 tokenizer")
    parser.add_argument("--probes", default="all")
    parser.add_argument("--limit-per-family", type=int, default=None)
    parser.add_argument("--variants", default="context", help="comma list: context,closed_book,aligned")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="ProbeScorer max_batch_tokens")
    parser.add_argument("--lm-eval-batch-sizes", default="1,16,64")
    parser.add_argument("--skip", default="", help="comma list of a,b,c,d to skip")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--probe-dtype", default=None, choices=["bfloat16", "float16"],
                        help="also time the engine round under autocast in this dtype, side by side with --dtype")
    parser.add_argument("--controls-every", type=int_list, default=None, metavar="K[,K...]",
                        help="also time context-only against context+controls rounds and the cost per event at K")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    args.skip_set = skip
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    if args.tiny:
        model = tiny_model(tokenizer).to(dtype)
    model.to(device).eval()
    probes = load_probes(args.probes, limit_per_family=args.limit_per_family)
    variants = tuple(args.variants.split(","))
    engine = ProbeScorer(probes, tokenizer, variants=variants, max_batch_tokens=args.batch_tokens)
    simple = ProbeScorer(probes, tokenizer, variants=variants, engine="simple")
    items = engine.encoded.items
    request_tokens = sum(2 * len(it.prompt_ids) + len(it.counterfactual_ids) + len(it.parametric_ids)
                         for it in items)
    print(f"model {'tiny-llama' if args.tiny else args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, {args.dtype}, {device}); {len(probes)} probes x {variants} = {2 * len(items)} requests, "
          f"{request_tokens} request tokens; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")

    rows, values = {}, {}

    def engine_values(result):
        return result.scores.reshape(-1)

    if "a" not in skip:
        seconds, result = timed(lambda: simple.score_raw(model), args.repeats)
        rows["(a) naive loop"] = seconds
        values["a"] = engine_values(result)
    if "c" not in skip:
        seconds, result = timed(lambda: engine.score_raw(model), args.repeats)
        rows[f"(c) ctx_callback ({engine.active_engine} engine)"] = seconds
        values["c"] = engine_values(result)
    if "b" not in skip:
        try:
            from lm_eval.models.huggingface import HFLM
        except ImportError:
            print("lm-eval is not installed (pip install lm-eval): skipping (b)")
        else:
            # The same token-level requests: lm-eval's string API would move the prompt's trailing "\n" into the
            # continuation (a different request). _loglikelihood_tokens is what HFLM.loglikelihood runs after
            # tokenizing, so this also leaves lm-eval's tokenization out of its time (in its favour).
            requests, order = [], []
            for row, it in enumerate(items):
                for k, answer in enumerate((it.counterfactual_ids, it.parametric_ids)):
                    text = (it.prompt_text, tokenizer.decode(answer))
                    requests.append((text, list(it.prompt_ids), list(answer)))
                    order.append((row, k))
            best = None
            for bs in [int(b) for b in args.lm_eval_batch_sizes.split(",")]:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=bs, device=str(device))
                run = lambda lm=lm: lm._loglikelihood_tokens(requests, disable_tqdm=True)  # noqa: E731
                seconds, result = timed(run, 1)
                print(f"  lm-eval batch_size={bs}: {seconds:.2f}s")
                if best is None or seconds < best[1]:
                    best = (bs, seconds, run, result)
            bs, _, run, _ = best
            seconds, result = timed(run, args.repeats)
            rows[f"(b) lm-eval HFLM (batch {bs})"] = seconds
            flat = np.full(2 * len(items), np.nan)  # in the items' request order
            for (row, k), (logp, _greedy) in zip(order, result):
                flat[2 * row + k] = logp
            values["b"] = flat
    if "d" not in skip:
        run, unique_tokens = lower_bound(model, engine, device)
        seconds, _ = timed(run, args.repeats)
        rows[f"(d) lower bound ({unique_tokens} unique tokens)"] = seconds

    print()
    print(f"{'method':48s} {'s/round':>9s} {'req tok/s':>10s}")
    for name, seconds in rows.items():
        print(f"{name:48s} {seconds:9.2f} {request_tokens / seconds:10.0f}")
    by = {name[:3]: s for name, s in rows.items()}
    print()
    for other in ("(a)", "(b)", "(d)"):
        if "(c)" in by and other in by:
            print(f"(c)/{other[1]} time ratio: {by['(c)'] / by[other]:.3f}  (speed-up {by[other] / by['(c)']:.2f}x)")
    if "a" in values and "c" in values:
        print(f"max |loglik (c) - simple unbatched (a)|: {np.nanmax(np.abs(values['c'] - values['a'])):.2e}")
    if "b" in values and "c" in values:
        c_items = items_scores(engine, values["c"])
        print(f"max |loglik (c) - lm-eval (b)|:          {np.nanmax(np.abs(c_items - values['b'])):.2e}")
    if args.probe_dtype:
        precision_report(model, probes, tokenizer, variants, args, device, args.dtype)
    if args.controls_every:
        controls_report(model, probes, tokenizer, args, device, args.dtype)


def items_scores(scorer, flat_scores):
    """Reorder ScoreResult.scores ([probes, variants, 2] flattened) into the items' request order."""
    variants = scorer.variants
    scores = flat_scores.reshape(len(scorer.probes), len(variants), 2)
    out = []
    for it in scorer.encoded.items:
        col = variants.index(it.variant)
        out.extend(scores[it.probe_index, col])
    return np.array(out)


if __name__ == "__main__":
    main()
