"""HeadScope against the tools people use today, on SmolLM2 (fp32, CPU), prompts of 128 .. 8,192 tokens.

For each length, in this process:
  sdpa       plain SDPA forward, nothing captured (the speed floor)
  HeadScope  `capture.api.run`: every head of every layer captured into the cache ("tril" maps up to
             2,048 tokens, "qk" queries/keys + reductions above), with its peak memory; then the
             server-side compute of what the head view draws at that length (Capture.head_overview +
             a 96 x 96 Capture.window; the whole map through Capture.head up to 2,048 tokens, where
             the app draws it) and of the model view (Capture.overview)
and in subprocesses with an address-space cap (RLIMIT_AS, `--cap-gb`, default 10 GB) and a time limit,
because they hold every map in memory and may blow it:
  eager      transformers' eager forward with output_attentions=True
  TL         TransformerLens 4 `TransformerBridge.run_with_cache` on SmolLM2 loaded from the local
             converted folder (it supports the Llama architecture; logits equal HF's), all hooks cached
  TL attn    the same with names_filter = hook_pattern only (the attention maps, nothing else)
  BertViz    head_view and model_view HTML from the eager attentions: generation time and HTML size
Ratios are peer / HeadScope (time) and peer / HeadScope (peak memory); failures are recorded (out of
memory, over the time limit, error).  Times are wall seconds, and CPU seconds (all threads) for the
HeadScope / SDPA ratio, because the 2-core machine is shared.  Usage:

    nice -n 19 .venv/bin/python bench/peers.py [--lengths 128 512 2048 4096 8192] [--cap-gb 10]

Peers: `make bench` installs bertviz and transformer-lens (see the Makefile).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, PeakMemory, prompt_of, table

CHILD = r"""
import gc, json, os, resource, sys, threading, time
cap = int(float(sys.argv[3]) * 2**30)
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.path.insert(0, sys.argv[1])
peer, n = sys.argv[2], int(sys.argv[4])
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
peak = [0]; stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
import torch
torch.set_num_threads(int(sys.argv[5]))
from capture import embedded, registry
from bench.common import prompt_of
handle = registry.load("smollm2")
tok, model = handle.tokenizer, handle.model
ids = torch.tensor([tok(prompt_of(tok, n))["input_ids"]])
warm = ids[:, :16]  # a first call pays one-off set-up costs: warm every path on 16 tokens first
out = {}
if peer in ("eager", "bertviz"):
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        model(input_ids=warm, use_cache=False, output_attentions=True)
gc.collect()
base = rss()
threading.Thread(target=sample, daemon=True).start()
t0, c0 = time.perf_counter(), time.process_time()
if peer == "eager":
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        res = model(input_ids=ids, use_cache=False, output_attentions=True)
    out["s"] = time.perf_counter() - t0
elif peer in ("tl", "tl_attn"):
    from transformer_lens.model_bridge import TransformerBridge
    folder = str(embedded.smollm2_folder())
    bridge = TransformerBridge.boot_transformers(folder, dtype=torch.float32, device="cpu", tokenizer=tok)
    with torch.inference_mode():
        bridge.run_with_cache(warm)
    gc.collect(); base = rss(); peak[0] = base
    t0, c0 = time.perf_counter(), time.process_time()
    kw = {"names_filter": lambda name: name.endswith("hook_pattern")} if peer == "tl_attn" else {}
    with torch.inference_mode():
        logits, cache = bridge.run_with_cache(ids, **kw)
    out["s"] = time.perf_counter() - t0
    out["cached_tensors"] = len(list(core.keys()))
elif peer == "bertviz":
    from bertviz import head_view, model_view
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        res = model(input_ids=ids, use_cache=False, output_attentions=True)
    out["forward_s"] = time.perf_counter() - t0
    tokens = tok.convert_ids_to_tokens(ids[0])
    t1 = time.perf_counter()
    html = head_view(res.attentions, tokens, html_action="return")
    out["head_view_s"], out["head_view_mb"] = time.perf_counter() - t1, len(html.data) / 2**20
    del html; gc.collect()
    t1 = time.perf_counter()
    html = model_view(res.attentions, tokens, html_action="return")
    out["model_view_s"], out["model_view_mb"] = time.perf_counter() - t1, len(html.data) / 2**20
    out["s"] = time.perf_counter() - t0
out["cpu_s"] = time.process_time() - c0
stop.set()
out["peak_mb"] = (max(peak[0], rss()) - base) / 2**20
print("RESULT " + json.dumps(out))
"""


def peer_run(peer: str, n: int, cap_gb: float, timeout: float, threads: int) -> dict:
    """Run one peer in a capped subprocess: its result dict, or {"failed": why}."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), peer, str(cap_gb), str(n), str(threads)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"failed": f"too slow (> {timeout / 60:.0f} min)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1][len("RESULT "):])
    err = done.stderr
    if "MemoryError" in err or "out of memory" in err.lower() or "std::bad_alloc" in err \
            or "Cannot allocate memory" in err or done.returncode in (-9, 137):
        return {"failed": f"out of memory (> {cap_gb:.0f} GB)"}
    last = (err.strip().splitlines() or ["?"])[-1]
    if "No module named" in last:
        return {"failed": "not installed (" + last.split("No module named")[-1].strip(" '") + ")"}
    return {"failed": "error: " + last[:80]}


def measure_headscope(store, prompt: str, n: int, seed: int) -> dict:
    import torch

    from capture import registry
    from capture.api import run
    from core.types import RunSpec

    handle = registry.load("smollm2")
    model, tok = handle.model, handle.tokenizer
    ids = torch.tensor([tok(prompt)["input_ids"]])
    out: dict = {}
    if seed == 0:  # a first call pays one-off set-up costs: warm both paths on a short input first
        model.set_attn_implementation("sdpa")
        with torch.inference_mode():
            model(input_ids=ids[:, :16], use_cache=False, logits_to_keep=1)
        model.set_attn_implementation("headscope")
        run(RunSpec(model="smollm2", prompt=tok.decode(ids[0, :16]), seed=-1), store=store)
        for key in store.keys():
            store.evict(key)
    gc.collect()
    model.set_attn_implementation("sdpa")
    with torch.inference_mode(), PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        out["sdpa_s"], out["sdpa_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    out["sdpa_peak"] = mem.peak / 2**20
    model.set_attn_implementation("headscope")
    gc.collect()
    with PeakMemory() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        capture = run(RunSpec(model="smollm2", prompt=prompt, seed=seed), store=store)
        out["hs_s"], out["hs_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    out["hs_peak"] = mem.peak / 2**20
    out["layout"], out["n"] = capture.layout, capture.n_tokens
    out["reported_peak"], out["estimate"] = capture.timings.get("peak_mb"), capture.timings.get("estimate_mb")
    out["disk_mb"] = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(store.directory)
                         for f in fs if f.endswith(".npy")) / 2**20
    # server-side compute of the head view and the model view, from a fresh read of the capture
    from capture.api import load_capture

    fresh = load_capture(capture.key, store)
    t0 = time.perf_counter()
    fresh.overview()
    out["overview_ms"] = (time.perf_counter() - t0) * 1000
    layer, head = 15, 4
    t0 = time.perf_counter()
    fresh.head_overview(layer, head, 128)
    q0 = max(0, n // 2 - 48)
    fresh.window(layer, head, q0, q0 + 96, q0, q0 + 96)
    out["head_view_ms"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    fresh.head(layer + 1, head)
    out["head_ms"] = (time.perf_counter() - t0) * 1000
    for key in store.keys():
        store.evict(key)
    return out


def fmt_peer(result: dict, hs_s: float, hs_peak: float) -> str:
    if "failed" in result:
        return result["failed"]
    return (f"{result['s']:.1f} s ({result['s'] / hs_s:.1f}x), {result['peak_mb'] / 1024:.2f} GB "
            f"({result['peak_mb'] / max(hs_peak, 1):.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 4096, 8192])
    parser.add_argument("--cap-gb", type=float, default=10.0, help="address-space cap of a peer's subprocess")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a peer may run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every tool (default 1: on a shared 2-core machine OpenMP's "
                             "barriers make 2-thread wall times mostly waiting)")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", help="also write the raw numbers to this file")
    args = parser.parse_args()
    os.environ.setdefault("HEADSCOPE_CACHE_DIR", str(ROOT / "cache_data"))
    import torch

    torch.set_num_threads(args.threads)
    from cache.store import Store
    from capture import registry

    tok = registry.load("smollm2").tokenizer
    workdir = tempfile.mkdtemp(prefix="hs-peers-")
    store = Store(os.path.join(workdir, "cache"), size_limit=40 * 2**30)
    raw, main_rows, peer_rows, bertviz_rows = [], [], [], []
    try:
        for i, n in enumerate(args.lengths):
            prompt = prompt_of(tok, n)
            hs = measure_headscope(store, prompt, n, seed=i)
            peers = {} if args.no_peers else {p: peer_run(p, n, args.cap_gb, args.timeout, args.threads)
                                             for p in ("eager", "tl", "tl_attn", "bertviz")}
            raw.append({"n": n, "headscope": hs, "peers": peers})
            print(f"done {n} tokens: {json.dumps(raw[-1])}", flush=True)
            main_rows.append([
                n, hs["layout"], f"{hs['sdpa_s']:.1f} / {hs['sdpa_cpu']:.1f}", f"{hs['hs_s']:.1f} / {hs['hs_cpu']:.1f}",
                f"{hs['hs_s'] / hs['sdpa_s']:.2f}x / {hs['hs_cpu'] / hs['sdpa_cpu']:.2f}x",
                f"{hs['hs_peak'] / 1024:.2f} (est. {hs['estimate'] / 1024:.2f})", f"{hs['disk_mb'] / 1024:.2f}",
                f"{hs['head_view_ms']:.0f}", f"{hs['overview_ms']:.0f}", f"{hs['head_ms']:.0f}",
            ])
            peer_rows.append([n, f"{hs['hs_s']:.1f} s, {hs['hs_peak'] / 1024:.2f} GB"]
                             + [fmt_peer(peers.get(p, {"failed": "not run"}), hs["hs_s"], hs["hs_peak"])
                                for p in ("eager", "tl", "tl_attn")])
            b = peers.get("bertviz", {"failed": "not run"})
            bertviz_rows.append([n, b["failed"]] if "failed" in b else
                                [n, f"{b['head_view_s']:.1f} s, {b['head_view_mb']:.0f} MB; "
                                    f"model_view {b['model_view_s']:.1f} s, {b['model_view_mb']:.0f} MB "
                                    f"(+ eager forward {b['forward_s']:.1f} s, peak {b['peak_mb'] / 1024:.1f} GB)"])
    finally:
        store.close()
        shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(raw, fh, indent=1)
    print(f"\ntorch threads: {args.threads}")
    print("\nHeadScope capture against the plain SDPA forward (wall s / CPU s; targets: <= 1.3x at 4,096 and "
          "8,192; peak <= 8 GB at 8,192; head view <= 300 ms at 8,192)\n")
    print(table(["tokens", "layout", "SDPA forward s", "HeadScope capture s", "capture / SDPA",
                 "capture peak GB", "cache GB", "head view ms (overview + 96x96 window)", "model view ms",
                 "full head map ms"], main_rows))
    print(f"\nPeers (each in a subprocess capped at {args.cap_gb:.0f} GB address space); "
          "time and peak memory, with the ratio to HeadScope's capture\n")
    print(table(["tokens", "HeadScope capture", "transformers eager output_attentions",
                 "TransformerLens run_with_cache (all hooks)", "TransformerLens run_with_cache (hook_pattern only)"],
                peer_rows))
    print("\nBertViz (eager attentions -> HTML), in a capped subprocess\n")
    print(table(["tokens", "head_view / model_view HTML"], bertviz_rows))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
