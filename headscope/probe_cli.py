"""`python -m headscope probe ...`: the probe subcommands (probes.runner), wired into headscope.cli.

    python -m headscope probe patterns --model smollm2 [--period 64 --repeats 3 --seed 0]
    python -m headscope probe needle   --model smollm2 [--lengths 256 512 --depths 0 50 100]
    python -m headscope probe ablation --model smollm2 [--mode zero|mean|uniform --prompt ... --target ...]
    python -m headscope probe gradient --model smollm2 [--n-texts 4 --n-tokens 128]
    python -m headscope probe duo      --model smollm2 [--steps 40 --context 384]
    python -m headscope probe hidden   KEY            # residual stream of a cached capture
    python -m headscope probe patching --model smollm2 [--clean ... --corrupted ... --target ' Mary' --foil ' John'
                                       --metric logit_diff|prob --direction denoise|noise --sender 9 3 --receivers q]
    python -m headscope probe dla      KEY [--target ' Mary' --foil ' John']   # direct logit attribution
    python -m headscope probe vlm_patching --model shapes-vlm [--clean-image scene-3 --corrupted-image scene-4
                                       --question 'what colour is the circle?' --target red --foil yellow
                                       --positions all|image|text]
    python -m headscope probe dit_patching --model shapes-dit [--clean 'a red circle at the center'
                                       --corrupted 'a blue circle at the center' --seed 0 --steps 20 --patch-pooled]
    python -m headscope probe vit_patching --model google/vit-base-patch16-224 [--clean-image cat
                                       --corrupted-image coffee --target '' --foil '']   # '' = each picture's top class

Flags mirror the fields of each probe's parameters (core.probe_results); omitted ones keep the defaults
that the metrics registry reads (they are left off the namespace, argparse.SUPPRESS).  Bad input
raises InputError: one sentence and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from headscope.terminal import progress_bar

HELP = {
    "patterns": "repeated random tokens: previous-token, induction, echo, duplicate-token scores",
    "needle": "needle-in-a-haystack sweep: retrieval and semantic retrieval scores",
    "ablation": "ablate every head alone (batched): drop in target log-prob",
    "gradient": "Michel et al. gradient head importance |dL/d gate|",
    "duo": "mini DuoAttention gate optimisation on synthetic passkeys",
    "hidden": "store the residual stream of a cached capture (massive activations)",
    "patching": "activation patching of every head from a clean prompt into a corrupted one (or path patching)",
    "dla": "direct logit attribution of a cached capture: every head, MLP and the embedding",
    "dit_patching": "activation patching of every head of shapes-dit between two prompts, measured on the picture",
    "vit_patching": "activation patching of every head of a ViT image classifier between two pictures (class logit)",
    "vlm_patching": "activation patching of every language-model head of a VLM from a clean picture into a corrupted one",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `probe` and its subcommands to the top-level subparsers."""
    from core.probe_results import CAPTURE_PROBES, PARAMS

    probe = sub.add_parser("probe", help="multi-pass head measurements (stored in the cache)")
    probes = probe.add_subparsers(dest="probe", required=True)
    for name, cls in PARAMS.items():
        q = probes.add_parser(name, help=HELP[name], description=(cls.__doc__ or "").strip())
        if name in CAPTURE_PROBES:
            q.add_argument("capture", help="capture key (python -m headscope ls lists them)")
        else:
            if name == "vlm_patching":
                q.add_argument("--model", default="shapes-vlm", help="shapes-vlm or another vision-language model")
            elif name == "dit_patching":
                q.add_argument("--model", default="shapes-dit", help="shapes-dit")
            elif name == "vit_patching":
                q.add_argument("--model", required=True, help="a ViT image classifier (hub id or folder)")
            else:
                q.add_argument("--model", default="smollm2", help="smollm2 or another causal LM")
        if name != "hidden":
            for f in fields(cls):
                if f.name == "capture":
                    continue
                default = f.default
                flag = "--" + f.name.replace("_", "-")
                if isinstance(default, bool):
                    q.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=f"default: {default}")
                elif isinstance(default, tuple):
                    kind = float if name == "needle" and f.name == "depths" else int
                    q.add_argument(flag, dest=f.name, nargs="+", type=kind, default=argparse.SUPPRESS,
                                   help=f"default: {' '.join(str(v) for v in default) or 'all'}")
                else:  # a None default is a number left to the model (dit_patching's guidance scale)
                    q.add_argument(flag, dest=f.name, type=float if default is None else type(default),
                                   default=argparse.SUPPRESS,
                                   help="default: the model's" if default is None else f"default: {default}")
        if name == "ablation":
            q.add_argument("--batch", type=int, default=None, help="heads per batched forward (default 3 x heads per layer)")
        if name in ("patching", "vlm_patching", "dit_patching", "vit_patching"):
            q.add_argument("--batch", type=int, default=None, help="heads per batched forward (default: by length)")
            q.add_argument("--parts", type=int, default=None,
                           help="split the sweep into this many layer ranges, run as batch jobs and merged "
                                "(probes.split); with --ray on Ray actors")
            q.add_argument("--ray", action="store_true", help="with --parts: run the parts on a local Ray instance")
            q.add_argument("--address", default=None, help="with --parts: an existing Ray cluster ('auto', host:port)")
            q.add_argument("--workers", type=int, default=2, help="with --parts --ray: Ray actors (default 2)")
        q.add_argument("--force", action="store_true", help="recompute even if the result is cached")
        q.add_argument("--json", action="store_true", help="print the stored record as JSON")
    probe.set_defaults(func=cmd_probe)


def cmd_probe(args: argparse.Namespace) -> int:
    from core.errors import InputError
    from core.probe_results import CAPTURE_PROBES, PARAMS
    from probes.runner import run_probe

    name = args.probe
    cls = PARAMS[name]
    options = {}
    if name in CAPTURE_PROBES:
        from capture.api import default_store, load_capture
        from core.keys import is_key

        if not is_key(args.capture):
            raise InputError(f"{args.capture!r} is not a capture key; `python -m headscope ls` lists them.")
        capture = load_capture(args.capture)
        if capture is None:
            raise InputError(f"No capture with key {args.capture} in the cache; `python -m headscope ls` lists them.")
        model = capture.spec.model
        params = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        params["capture"] = args.capture
        options["store"] = default_store()
    else:
        model = args.model
        params = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}  # omitted: defaults
        if name in ("ablation", "patching", "vlm_patching", "dit_patching", "vit_patching") and args.batch is not None:
            if args.batch < 1:
                raise InputError("--batch must be 1 or more.")
            options["batch_size"] = args.batch
    bar, update = progress_bar(f"probe {name} {model}")
    try:
        if getattr(args, "parts", None) is not None:
            from probes.split import split_sweep

            if args.batch is not None:
                raise InputError("--batch and --parts do not go together: each part picks its own batch size.")

            result = split_sweep(name, model, params, args.parts, None, update, args.force, ray=args.ray,
                                 address=args.address, workers=args.workers)
        elif name in CAPTURE_PROBES:
            result = run_probe(name, model, params, options.pop("store"), update, args.force)
        else:
            result = run_probe(name, model, params, None, update, args.force, **options)
    finally:
        bar.close()
    record = result.record
    if args.json:
        print(json.dumps({"key": result.key, **record}, ensure_ascii=False))
        return 0
    print(f"probe {name} on {model}: key {result.key}, {record.get('seconds', 0):.1f} s to compute, "
          f"{len(record.get('arrays', []))} arrays")
    summary = record.get("summary", {})
    for label, value in summary.items():
        if isinstance(value, list) and value and isinstance(value[0], list):
            heads = ", ".join(f"L{v[0]}H{v[1]}" + (f"={v[2]:.3g}" if len(v) > 2 else "") for v in value[:8])
            print(f"  {label}: {heads}")
        elif isinstance(value, dict):
            for sub, rows in value.items():
                heads = ", ".join(f"L{v[0]}H{v[1]}={v[2]:.3g}" for v in rows[:5])
                print(f"  {label} {sub}: {heads}")
        else:
            print(f"  {label}: {value}")
    if name == "needle":
        for t in record.get("tests", []):
            mark = "counted" if t["counted"] else "not counted"
            print(f"  {t['length']:>5} tok  depth {t['depth']:>5.1f}%  needle {t['needle']}  "
                  f"ROUGE-1 {t['recall']:.2f} ({mark}): {t['answer'][:60]!r}")
    sys.stdout.flush()
    return 0
