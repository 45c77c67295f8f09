"""Command line: python -m headscope {run,ls,export,probe} ...

    python -m headscope run --model smollm2 --prompt "The capital of France is" --max-new-tokens 20
    python -m headscope run --model smollm2 --prompt "..." --json        # one JSON object, for scripts
    python -m headscope run --model ./sd3-medium --prompt "a red cube" --size 512x512 --steps 28  # a diffusers folder
    python -m headscope run --model ./z-image-turbo --prompt "a red cube" --steps 9 --guidance 0  # no guidance
    python -m headscope ls                                              # cached captures
    python -m headscope export KEY --layer 3 --head 2 --format csv -o map.csv
    python -m headscope probe patterns --model smollm2                  # head probes (headscope/probe_cli.py)
    python -m headscope batch prompts.jsonl [--ray | --ray-address ADDR] # many captures (headscope/batch_cli.py)
    python -m headscope run --model ./Llama-3.2-1B --device cuda --dtype bfloat16 --prompt "..."  # on a GPU
    python -m headscope --device cuda probe ablation --model ./pythia-160m  # --device / --dtype before any command

--device and --dtype set HEADSCOPE_DEVICE and HEADSCOPE_DTYPE for this command (capture.engine.device:
auto = a CUDA GPU when there is one, bfloat16 there, float32 on the CPU).

Errors are one sentence on stderr and exit status 2; never a traceback for bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from core import dit_capture
from core.errors import USER_ERRORS, CliError
from headscope.batch_cli import add_parser as add_batch_parser
from headscope.probe_cli import add_parser as add_probe_parser
from headscope.terminal import progress_bar


def picture_size(text: str | None) -> tuple[int, int]:
    """--size WIDTHxHEIGHT -> (height, width) in pixels; (0, 0), the model's default, when not given."""
    if not text:
        return 0, 0
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise CliError(f"--size is WIDTHxHEIGHT in pixels, e.g. 512x512, not {text[:20]!r}.")
    return int(height), int(width)


def kept_steps(text: str) -> tuple[int, ...]:
    """--keep 5,20 as RunSpec.keep; CliError (one sentence) for anything else."""
    try:
        return dit_capture.kept_steps(text)
    except ValueError:
        raise CliError(f"--keep is a list of sampling steps, e.g. 5,20, not {text[:20]!r}.") from None


def cmd_run(args: argparse.Namespace) -> int:
    from capture.api import run
    from core.types import RunSpec

    height, width = picture_size(args.size)
    spec = RunSpec(model=args.model, prompt=args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                   image=args.image, seed=args.seed, steps=args.steps, height=height, width=width,
                   keep=kept_steps(args.keep), guidance=args.guidance)
    bar, update = progress_bar(f"capture {args.model}")
    try:
        capture = run(spec, progress=update)
    finally:
        bar.close()
    m = capture.meta
    picture = dit_capture.generated_image(capture) if m.modality == "dit" else None
    if args.json:
        print(json.dumps({
            "key": capture.key, "from_cache": capture.from_cache, "model": m.name, "family": m.family,
            "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "head_dim": m.head_dim,
            "n_tokens": capture.n_tokens, "tokens": capture.tokens,
            "spans": {k: [v.start, v.stop] for k, v in capture.spans.items()},
            "text": capture.output.text, "notes": capture.output.notes, "image": capture.spec.image,
            "grid": m.grid, "classes": capture.output.classes, "layout": capture.layout,
            "seed": capture.spec.seed, "sampling_steps": capture.spec.steps, "timesteps": capture.output.timesteps,
            "full_map_steps": dit_capture.full_steps(capture) if picture is not None else None,
            "width": None if picture is None else picture.shape[1],
            "height": None if picture is None else picture.shape[0],
            "peak_mb": capture.timings.get("peak_mb"), "estimate_mb": capture.timings.get("estimate_mb"),
            "gpu_peak_mb": capture.timings.get("gpu_peak_mb"), "groups": m.groups,
            "steps": [{"token": s.token, "logprob": s.logprob, "top": s.top} for s in capture.output.steps],
        }, ensure_ascii=False))
        return 0
    if capture.meta.modality == "dit":
        print(f"sampled a {picture.shape[1]} x {picture.shape[0]} picture in "
              f"{capture.spec.steps or 'the default number of'} steps from seed {capture.spec.seed}; "
              f"{len(capture.output.recorded_steps)} steps recorded ({capture.meta.grid[0]} x {capture.meta.grid[1]} "
              f"image tokens + {len(capture.spans['text'])} text tokens); key {capture.key}")
    elif capture.meta.modality == "vision":
        print(f"{capture.n_tokens} tokens ({capture.meta.grid[0]} x {capture.meta.grid[1]} patches); key {capture.key}")
        for label, prob in capture.output.classes:
            print(f"{prob:7.2%}  {label}")
    else:
        print(capture.output.text if capture.output.text else "(prefill only: nothing generated)")
    for note in capture.output.notes:
        print(f"note: {note}")
    print(f"model: {m.name} ({m.family}), {m.n_layers} layers x {m.n_heads} heads "
          f"({m.n_kv_heads} KV heads), head_dim {m.head_dim}, {capture.n_tokens} tokens")
    if m.groups:
        print("layers: " + ", ".join(f"{name} {start}-{stop - 1}" for name, (start, stop) in m.groups.items()))
    print(f"key:   {capture.key}{'  (from cache)' if capture.from_cache else ''}")
    if "peak_mb" in capture.timings:
        print(f"memory: peak {capture.timings['peak_mb']:.0f} MB above the loaded model "
              f"(estimated {capture.timings.get('estimate_mb', 0):.0f} MB); layout {capture.layout}")
    if "gpu_peak_mb" in capture.timings:
        print(f"GPU memory: peak {capture.timings['gpu_peak_mb']:.0f} MB above the loaded model")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from capture.api import default_store, load_capture

    store = default_store()
    rows = []
    for key in store.keys():
        capture = load_capture(key, store)
        if capture is None:
            continue
        prompt = capture.spec.prompt.replace("\n", " ")
        rows.append((key, capture.meta.name, capture.n_tokens, prompt[:48] + ("…" if len(prompt) > 48 else "")))
    if args.json:
        print(json.dumps([dict(zip(("key", "model", "tokens", "prompt"), r)) for r in rows], ensure_ascii=False))
        return 0
    if not rows:
        print(f"no captures in {store.directory}")
        return 0
    print(f"{'key':20}  {'model':10} {'tokens':>6}  prompt")
    for key, model, n, prompt in rows:
        print(f"{key:20}  {model:10} {n:>6}  {prompt}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from capture.api import load_capture
    from core.keys import is_key

    if not is_key(args.key):
        raise CliError(f"{args.key!r} is not a capture key; `python -m headscope ls` lists them.")
    capture = load_capture(args.key)
    if capture is None:
        raise CliError(f"No capture with key {args.key} in the cache; `python -m headscope ls` lists them.")
    m = capture.meta
    if not 0 <= args.layer < m.n_layers or not 0 <= args.head < m.n_heads:
        raise CliError(f"Layer {args.layer}, head {args.head} is outside this model "
                       f"({m.n_layers} layers x {m.n_heads} heads).")
    attn = capture.head(args.layer, args.head)  # [query, key]
    out = Path(args.output or f"{args.key}_L{args.layer}_H{args.head}.{args.format}")
    if args.format == "npy":
        np.save(out, np.asarray(attn), allow_pickle=False)
    else:
        with open(out, "w", encoding="utf-8", newline="") as fh:
            import csv

            writer = csv.writer(fh)
            writer.writerow(["query \\ key"] + [f"{i}:{t}" for i, t in enumerate(capture.tokens)])
            for i, row in enumerate(np.asarray(attn, dtype=np.float32)):
                writer.writerow([f"{i}:{capture.tokens[i]}"] + [f"{v:.6g}" for v in row])
    print(f"wrote {out} ({attn.shape[0]} x {attn.shape[1]}, layer {args.layer}, head {args.head})")
    return 0


def add_placement(p: argparse.ArgumentParser) -> None:
    """--device and --dtype (left out of the namespace when not given, so either place may set them)."""
    p.add_argument("--device", default=argparse.SUPPRESS,
                   help="where models run: auto (a CUDA GPU when there is one), cpu, cuda, cuda:N (HEADSCOPE_DEVICE)")
    p.add_argument("--dtype", default=argparse.SUPPRESS,
                   help="model precision: auto (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16, float16 "
                        "(HEADSCOPE_DTYPE); softmax is float32 and stored maps float16 either way")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m headscope", description="HeadScope: capture attention maps, run head probes, batch work")
    add_placement(p)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="capture a prompt (and generation) into the cache")
    add_placement(r)
    r.add_argument("--model", default="smollm2", help="smollm2, minilm, a Hugging Face id or a local folder")
    r.add_argument("--prompt", default="")
    r.add_argument("--image", help="vision models: a sample name (cat, astronaut, ...) or an image file")
    r.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    r.add_argument("--max-new-tokens", type=int, default=0)
    r.add_argument("--seed", type=int, default=0, help="diffusion models: the sampling seed")
    r.add_argument("--steps", type=int, default=0, help="diffusion models: sampling steps (0: the model's default)")
    r.add_argument("--size", help="diffusion models: picture size WIDTHxHEIGHT in pixels, e.g. 512x512 "
                                  "(the model's default when not given)")
    r.add_argument("--keep", default="", help="diffusion models: the sampling steps whose full maps a capture too "
                                              "large to keep every map keeps, e.g. 5,20 (default: the middle one)")
    r.add_argument("--guidance", type=float, default=None,
                   help="diffusion models: the classifier-free guidance scale (the model's default when not given)")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_run)
    ls = sub.add_parser("ls", help="list cached captures")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)
    e = sub.add_parser("export", help="write one head's map as .npy or .csv")
    e.add_argument("key")
    e.add_argument("--layer", type=int, required=True)
    e.add_argument("--head", type=int, required=True)
    e.add_argument("--format", choices=("npy", "csv"), default="npy")
    e.add_argument("-o", "--output", help="output file (default KEY_L<layer>_H<head>.<format>)")
    e.set_defaults(func=cmd_export)
    add_probe_parser(sub)
    add_batch_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from capture.engine.device import DEVICE_ENV, DTYPE_ENV

    args = parser().parse_args(argv)
    for flag, env in (("device", DEVICE_ENV), ("dtype", DTYPE_ENV)):
        if hasattr(args, flag):  # this command's setting (and its Ray workers', which inherit HEADSCOPE_*)
            os.environ[env] = getattr(args, flag)
    if getattr(args, "max_new_tokens", 0) < 0:
        print("error: --max-new-tokens must be 0 or more.", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the cache is consistent (an unfinished capture is never marked complete).",
              file=sys.stderr)
        return 130

