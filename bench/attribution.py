"""Attribution speed on SmolLM2 (fp32, CPU), against the targets of issue 24.

  patching  the full per-head activation patching sweep (all 270 heads, clean -> corrupted, batched with
            a shared unpatched prefix) of a 32-token IOI prompt pair, against 270 plain forward passes of
            that prompt (what a one-head-per-pass sweep costs at least).  Target: <= 2x the baseline.
  dla       direct logit attribution of one token (every head, MLP and the embedding at every position,
            one forward with the components recorded), beyond the capture.  Target: <= 1 s.
  path      path patching from one sender to the queries of every later head (for scale; no target).
The machine is shared: the sweep and its baseline are taken in turn `--rounds` times and the fastest of
each is kept.  Prints a Markdown table.  Usage:
    .venv/bin/python bench/attribution.py [--tokens 32] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from common import PeakMemory, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("HEADSCOPE_CACHE_DIR", os.path.join(os.getcwd(), "cache_data"))
    workdir = tempfile.mkdtemp(prefix="hs-bench-attribution-")
    from analytics.attribution import patching_effect, rank_agreement
    from cache.store import Store
    from capture import registry
    from capture.api import run
    from core.probe_results import IOI_CLEAN, IOI_CORRUPTED, PatchingParams
    from core.types import RunSpec
    from probes.common import haystack_ids
    from probes.dla import attribute
    from probes.patch_runs import answer_of, last_logits
    from probes.patching import patching_sweep
    from probes.path_patching import path_patching_sweep
    from probes.runner import run_probe

    handle = registry.load("smollm2")
    tok = handle.tokenizer
    ioi = [tok(text, add_special_tokens=False)["input_ids"] for text in (IOI_CLEAN, IOI_CORRUPTED)]
    prefix = haystack_ids(tok, args.tokens - len(ioi[0]))  # pads the IOI pair to exactly --tokens tokens
    clean, corrupted = prefix + ioi[0], prefix + ioi[1]
    answer = answer_of(tok, PatchingParams())
    n_heads = handle.meta.n_layers * handle.meta.n_heads
    store = Store(os.path.join(workdir, "cache"), size_limit=2**30)
    rows = []
    try:
        input_ids = torch.tensor([corrupted])
        with torch.inference_mode():
            last_logits(handle, input_ids)  # warm up
        plain, sweep, peak = [], [], 0
        for _ in range(args.rounds):
            with torch.inference_mode():
                t0 = time.perf_counter()
                for _ in range(n_heads):
                    last_logits(handle, input_ids)
                plain.append(time.perf_counter() - t0)
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                clean_value, corrupted_value, patched = patching_sweep(handle, clean, corrupted, answer)
                sweep.append(time.perf_counter() - t0)
            peak = max(peak, mem.peak)
        rows.append([f"patching sweep, all {n_heads} heads, {len(clean)} tokens (batched)", f"{min(sweep):.2f}",
                     f"{n_heads} plain forward passes", f"{min(plain):.2f}", f"{min(sweep) / min(plain):.2f}",
                     "<= 2.00", f"{peak / 2**20:.0f} MB"])

        capture = run(RunSpec(model="smollm2", prompt=tok.decode(clean)), store=store)
        targets = torch.full((capture.n_tokens,), answer.target)
        foils = torch.full((capture.n_tokens,), answer.foil)
        inputs = {"input_ids": torch.tensor([capture.output.token_ids]), "use_cache": False}
        attribute(handle, inputs, targets, foils)  # warm up
        t0 = time.perf_counter()
        terms = attribute(handle, inputs, targets, foils)
        dla_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_probe("dla", "smollm2", {"capture": capture.key, "target": " Mary", "foil": " John"}, store=store)
        probe_s = time.perf_counter() - t0
        rows.append([f"DLA of one token ({capture.n_tokens}-token capture): the forward and the terms",
                     f"{dla_s:.2f}", "target 1 s", "1.00", f"{dla_s:.2f}", "<= 1.00", ""])
        rows.append(["  the same through run_probe (stored in the cache)", f"{probe_s:.2f}", "target 1 s", "1.00",
                     f"{probe_s:.2f}", "<= 1.00", ""])

        t0 = time.perf_counter()
        path_patching_sweep(handle, clean, corrupted, answer, (20, 0), "q")
        path_s = time.perf_counter() - t0
        rows.append([f"path patching L20 H0 -> queries of layers 21-29 ({9 * handle.meta.n_heads} receivers)",
                     f"{path_s:.2f}", "", "", "", "", ""])
        effect = patching_effect(patched, clean_value, corrupted_value)
        agree = rank_agreement(terms["heads"][:, :, -1], effect)
    finally:
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"SmolLM2-135M fp32 on CPU ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores)\n")
    print(table(["measurement", "seconds", "baseline", "baseline s", "ratio", "target", "peak memory rise"], rows))
    print(f"\nDLA vs patching rank agreement on this {len(clean)}-token pair: Spearman {agree['spearman']:.2f}, "
          f"top-{agree['k']} overlap {agree['top_overlap']:.0%}")


if __name__ == "__main__":
    main()
