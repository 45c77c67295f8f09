"""Capture on a GPU (issue 20): time against the plain SDPA forward and peak GPU memory, at long inputs.

Random-weight models of two shapes, built here (no download): Llama-3.2-1B's (16 layers x 32 heads over 8
KV heads, hidden 2,048) and SmolLM2-135M's (30 layers x 9 heads over 3), each with a context long enough
for the longest input.  For each input length, every head of every layer:
  sdpa     the plain forward with transformers' SDPA attention, nothing recorded (the floor)
  capture  HeadScope's recorded pass and the cache writes (capture.text.adapter: the stored "tril" maps up
           to HEADSCOPE_QK_THRESHOLD = 2,048 tokens, the "qk" layout above), prefill only
  ratio    capture / sdpa; the targets are <= 1.3 at 8,192 and 32,768 tokens
  GPU peak the allocator's peak above the loaded model during the capture (Capture.timings gpu_peak_mb);
           the target is <= 2 GB above the model
Prints the device (the GPU's name), the dtype and a Markdown table.  Usage:
    .venv/bin/python bench/gpu.py                                   # auto: the GPU in bfloat16
    .venv/bin/python bench/gpu.py --device cpu --lengths 256 1024 --models smollm2   # the same code on the CPU
Deviation: the inputs are random token ids from a 4,096-word tokenizer (maps of random weights, the
same cost as real text).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from common import table

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
}
WORDS = 4096
TARGET_RATIO = 1.3
TARGET_EXTRA_GB = 2.0


def word_tokenizer():
    """One token per word w0 .. w4095 (and <pad>, </s>, <s>): an input of n words is n tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<s>"] + [f"w{i}" for i in range(WORDS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def build(shape: str, context: int):
    """A random model of `shape` on HeadScope's device in its dtype, prepared for capture."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from capture.engine import device
    from capture.engine.handle import prepare

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=context, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=device.dtype()).to(device.device()).eval()
    return prepare(shape, model, word_tokenizer())


def sync(where: torch.device) -> None:
    if where.type == "cuda":
        torch.cuda.synchronize(where)


def sdpa_seconds(handle, ids: torch.Tensor, repeats: int) -> float:
    """Median wall time of the plain SDPA forward (the model's own attention, no HeadScope)."""
    model = handle.model
    model.set_attn_implementation("sdpa")
    times = []
    try:
        for _ in range(repeats + 1):  # the first call pays one-off set-up
            sync(ids.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            sync(ids.device)
            times.append(time.perf_counter() - t0)
    finally:
        model.set_attn_implementation("headscope")
    return statistics.median(times[1:])


def capture_once(handle, prompt: str, store) -> tuple[float, object]:
    from capture.text.adapter import TextAdapter
    from core.progress import no_progress
    from core.types import RunSpec

    spec = RunSpec(model=handle.name, prompt=prompt, seed=time.monotonic_ns())  # a fresh key each time
    sync(handle.model.device)
    t0 = time.perf_counter()
    with handle.lock:
        capture = TextAdapter(handle).capture(spec, spec.key(), store, no_progress)
    sync(handle.model.device)
    return time.perf_counter() - t0, capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (HEADSCOPE_DEVICE)")
    parser.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (HEADSCOPE_DTYPE)")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.device:
        os.environ["HEADSCOPE_DEVICE"] = args.device
    if args.dtype:
        os.environ["HEADSCOPE_DTYPE"] = args.dtype
    from cache.store import Store
    from capture.engine import device

    where = device.device()
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else "CPU"
    print(f"device: {where} ({name}), dtype {device.dtype_name()}, torch {torch.__version__}")
    workdir = tempfile.mkdtemp(prefix="hs-gpu-bench-")
    store = Store(os.path.join(workdir, "cache"), size_limit=512 * 2**30)
    rng = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.models:
        handle = build(shape, max(args.lengths) + 1)
        model_gb = sum(p.numel() * p.element_size() for p in handle.model.parameters()) / 2**30
        capture_once(handle, " ".join(f"w{i}" for i in range(64)), store)  # warm-up: kernels, allocator
        for n in args.lengths:
            words = torch.randint(0, WORDS, (n,), generator=rng).tolist()
            prompt = " ".join(f"w{i}" for i in words)
            ids = torch.tensor([handle.tokenizer(prompt)["input_ids"]], device=handle.model.device)
            sdpa = sdpa_seconds(handle, ids, args.repeats)
            seconds, capture = capture_once(handle, prompt, store)
            store.evict(capture.key)
            peak = capture.timings.get("gpu_peak_mb", capture.timings.get("peak_mb", 0.0)) / 1024
            ratio = seconds / sdpa
            ok = "yes" if (n < 8192 or ratio <= TARGET_RATIO) and peak <= TARGET_EXTRA_GB else "no"
            rows.append([shape, f"{n:,}", capture.layout, f"{sdpa:.3f}", f"{seconds:.3f}", f"{ratio:.2f}",
                         f"{model_gb:.2f}", f"{peak:.2f}", ok])
            print(f"  {shape} {n}: sdpa {sdpa:.3f} s, capture {seconds:.3f} s ({capture.layout}), "
                  f"peak {peak:.2f} GB above the model", flush=True)
        del handle
        if where.type == "cuda":
            torch.cuda.empty_cache()
    memory = "GPU peak above model (GB)" if where.type == "cuda" else "host peak above model (GB)"
    print(table(["model", "tokens", "layout", "sdpa (s)", "capture (s)", "capture / sdpa", "model (GB)", memory,
                 "targets met"], rows))


if __name__ == "__main__":
    main()
