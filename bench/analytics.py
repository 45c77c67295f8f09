"""Head analytics speed on SmolLM2 (fp32, CPU), against their targets and baselines (issue: head analytics).

  metrics   every one-pass metric (sink_alpha, act_sink, lookback, entropy, waad, fai) of a cached
            2,048-token capture, read from the cache and streamed by layer (cold: no remembered summary,
            the capture re-opened).  Target: <= 10 s on 2 cores.
  ablation  the full single-head ablation sweep (every one of the 270 heads, zero mode, batched with a
            shared clean prefix) on a 128-token prompt, against 270 plain SDPA forward passes of that
            prompt (what a one-head-per-pass sweep costs at least).  Target: <= 2x the baseline.
Prints a Markdown table.  Usage:
    .venv/bin/python bench/analytics.py [--tokens 2048] [--ablation-tokens 128]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from common import PeakMemory, prompt_of, table

METRIC_NAMES = ("sink_alpha", "act_sink", "lookback", "entropy", "waad", "fai")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ablation-tokens", type=int, default=128)
    args = parser.parse_args()

    os.environ.setdefault("HEADSCOPE_CACHE_DIR", os.path.join(os.getcwd(), "cache_data"))
    workdir = tempfile.mkdtemp(prefix="hs-bench-analytics-")
    import analytics
    from analytics.summary import forget
    from cache.store import Store
    from capture import registry
    from capture.api import load_capture, run
    from core.types import RunSpec
    from probes.ablation import ablation_sweep

    handle = registry.load("smollm2")
    model, tok = handle.model, handle.tokenizer
    store = Store(os.path.join(workdir, "cache"), size_limit=20 * 2**30)
    rows = []
    try:
        # ---- one-pass metrics of a long capture, from the cache --------------------------------
        prompt = prompt_of(tok, args.tokens)
        t0 = time.perf_counter()
        capture = run(RunSpec(model="smollm2", prompt=prompt), store=store)
        capture_s = time.perf_counter() - t0
        shapes = {}
        forget()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            fresh = load_capture(capture.key, store)  # re-open: reads (and checksums) every layer file
            for name in METRIC_NAMES:
                shapes[name] = analytics.compute(name, fresh).shape
            metrics_s = time.perf_counter() - t0
        layer_mb = capture.meta.n_heads * args.tokens * args.tokens * 4 / 2**20
        rows.append([f"6 one-pass metrics, {args.tokens}-token capture (from cache)", f"{metrics_s:.2f}",
                     "target 10 s", "10.00", f"{metrics_s / 10:.2f}", "<= 1.00",
                     f"{mem.peak / 2**20:.0f} MB (one fp32 layer: {layer_mb:.0f} MB)"])
        rows.append([f"(capture of those {args.tokens} tokens, for scale)", f"{capture_s:.2f}", "", "", "", "", ""])

        # ---- ablation sweep vs plain passes ----------------------------------------------------
        ids = tok(prompt_of(tok, args.ablation_tokens))["input_ids"]
        n_heads = handle.meta.n_layers * handle.meta.n_heads
        scored = range(len(ids) - 32, len(ids))
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False, logits_to_keep=1)  # warm up
            t0 = time.perf_counter()
            for _ in range(n_heads):
                model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
            plain_s = time.perf_counter() - t0
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            clean, ablated = ablation_sweep(handle, ids, scored, "zero")
            sweep_s = time.perf_counter() - t0
        assert ablated.shape == (handle.meta.n_layers, handle.meta.n_heads)
        rows.append([f"ablation sweep, all {n_heads} heads, {len(ids)} tokens (batched)", f"{sweep_s:.2f}",
                     f"{n_heads} plain forward passes", f"{plain_s:.2f}", f"{sweep_s / plain_s:.2f}", "<= 2.00",
                     f"{mem.peak / 2**20:.0f} MB"])
    finally:
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"SmolLM2-135M fp32 on CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)\n")
    print(table(["measurement", "seconds", "baseline", "baseline s", "ratio", "target", "peak memory rise"], rows))


if __name__ == "__main__":
    main()
