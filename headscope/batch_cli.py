"""`python -m headscope batch FILE.jsonl`: many captures (or probes) at once, wired into headscope.cli.

    python -m headscope batch prompts.jsonl                      # in this process
    python -m headscope batch prompts.jsonl --ray --workers 2    # on a local Ray instance, 2 actors
    python -m headscope batch prompts.jsonl --ray-address auto   # on a running Ray cluster

One JSON object per line: a RunSpec ({"model": "smollm2", "prompt": "...", "max_new_tokens": 8,
"chat": false, "intervention": {...}}; `model` defaults to smollm2) or a probe ({"probe": "needle",
"model": "smollm2", "params": {"lengths": [512]}}).  Blank lines and lines starting with # are
skipped.  Jobs already in the cache are skipped, failures are retried (--retries, default 1) and
reported in the table; the exit status is 0 when every job is done or cached, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("batch", help="run many captures / probes from a JSONL file (in-process or on Ray)",
                       description=(__doc__ or "").split("\n\n")[1])
    b.add_argument("file", help="JSONL file: one RunSpec-like JSON object per line")
    b.add_argument("--ray", action="store_true", help="run on a local Ray instance (ray.init())")
    b.add_argument("--ray-address", help="run on the Ray cluster at this address (e.g. auto, host:6379)")
    b.add_argument("--workers", type=int, default=2, help="Ray actors (each keeps its models loaded); default 2")
    b.add_argument("--retries", type=int, default=1, help="retries of a failed job; default 1")
    b.add_argument("--json", action="store_true", help="print one JSON object per job instead of a table")
    b.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from core.errors import InputError
    from probes.batch import JobResult, run_batch
    from probes.jobs import read_jobs

    if args.workers < 1 or args.retries < 0:
        raise InputError("--workers must be 1 or more and --retries 0 or more.")
    try:
        lines = read_jobs(args.file)
    except OSError as exc:
        raise InputError(f"Cannot read {args.file} ({exc.strerror or exc}).") from exc
    if not lines:
        raise InputError(f"{args.file} has no jobs (one JSON object per line).")
    jobs = [job for _, job, _ in lines if job is not None]
    where = f"Ray at {args.ray_address}" if args.ray_address else ("local Ray" if args.ray else "this process")
    bar = tqdm(total=len(lines), desc=f"batch ({where})", unit="job", file=sys.stderr, leave=False)
    bad = [(n, err) for n, job, err in lines if job is None]
    bar.update(len(bad))

    def progress(done: int, total: int, result: JobResult) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{result.status}: {result.label[:30]}", refresh=True)

    try:
        results = run_batch(jobs, ray=args.ray, address=args.ray_address, workers=args.workers,
                            retries=args.retries, progress=progress)
    finally:
        bar.close()
    # back to file order, invalid lines included
    rows, it = [], iter(results)
    for number, job, err in lines:
        if job is None:
            rows.append((number, JobResult(-1, "(invalid line)", "failed", error=err)))
        else:
            rows.append((number, next(it)))
    failed = sum(1 for _, r in rows if not r.ok)
    if args.json:
        for number, r in rows:
            print(json.dumps({"line": number, **r.to_json()}, ensure_ascii=False))
    else:
        print(f"{'line':>4}  {'status':7} {'tries':>5} {'seconds':>8}  {'key':20}  job / error")
        for number, r in rows:
            detail = r.label if r.ok else f"{r.label}: {r.error}"
            print(f"{number:>4}  {r.status:7} {r.attempts:>5} {r.seconds:>8.1f}  {r.key or '-':20}  {detail}")
        counts = {s: sum(1 for _, r in rows if r.status == s) for s in ("done", "cached", "failed")}
        print(f"{counts['done']} done, {counts['cached']} cached, {counts['failed']} failed ({where})")
    return 1 if failed else 0
