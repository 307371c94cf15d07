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

Usage::

    python benchmarks/probe_speed.py                    # SmolLM2-135M-Instruct fp32 on CPU, all built-in suites
    python benchmarks/probe_speed.py --tiny --repeats 1 # a tiny random Llama: a quick smoke run
    python benchmarks/probe_speed.py --device cuda --dtype bfloat16
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
from ctx_callback.models import SMOLLM2_ALIAS, load_model_and_tokenizer


def timed(fn, repeats: int):
    fn()  # warm-up (allocator, thread pools, lazy init)
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
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
