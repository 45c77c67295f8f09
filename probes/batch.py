"""Batch work: many captures (or probes) through one function, in-process by default, on Ray when asked.

    from probes.batch import run_batch
    from probes.jobs import CaptureJob, ProbeJob, sweep

    jobs = [CaptureJob(RunSpec(model="smollm2", prompt=p)) for p in prompts]
    results = run_batch(jobs)                                   # in this process, one after another
    results = run_batch(jobs, ray=True, workers=2)              # a local Ray instance, 2 actors
    results = run_batch(jobs, ray=True, address="auto")         # an existing cluster (or "host:6379",
                                                                # "ray://host:10001")
    run_batch([ProbeJob("needle", "smollm2", {"lengths": [512]})], ray=True)
    run_batch(sweep("ablation", ["smollm2", "./pythia-160m"], {"mode": ["zero", "mean"]}), ray=True)

(DESIGN.md, "Scale-out".)  Whatever runs a job, its result lands in the same cache (`store`, default
`capture.api.default_store()`): on Ray every actor opens the same cache directory, which must
therefore be shared by the nodes (a local disk for a local instance, a network file system for a
cluster), and every node needs this checkout on the same path.  The cache's per-key lock makes two
workers that meet the same job compute it once.

- A job already in the cache is skipped ("cached") before anything is started; a batch whose jobs
  are all cached never starts Ray.
- A job that raises is retried `retries` times (default once), on any free worker; a Ray actor that
  dies (out of memory, killed) is restarted once and its job retried.  Invalid input (InputError,
  InterventionError, ModelUnavailable: the same answer every time) is reported without a retry.  A
  failure is a `JobResult` with status "failed" and the error's first line; the batch goes on.
- Ray actors keep their models loaded (`capture.registry.load` caches per process), so a model is
  loaded once per worker, not once per job.  Each actor takes `num_cpus=1` (Ray then runs torch
  single-threaded in it): `workers` actors use `workers` cores.
- `progress(done, total, result)` is called as each job finishes (cached ones included).

The jobs (`CaptureJob`, `ProbeJob`, `sweep` for probe grids: ablation over models and modes, needle
grids, HeadHunter-lite over objectives, each cell cached on its own) and the batch file are
probes.jobs.  Workers inherit HEADSCOPE_DEVICE / HEADSCOPE_DTYPE; on a GPU each actor
asks Ray for `gpus_per_worker` GPUs (default: the GPUs over the actors, at most 1).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from core.types import RunSpec
from probes.jobs import CaptureJob, Job, error_line

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKERS = 2
DEFAULT_RETRIES = 1
OBJECT_STORE_BYTES = 128 * 2**20  # a local instance ships small dicts only
# environment the workers need to behave like this process (cache and model locations, thresholds)
FORWARDED_ENV_PREFIXES = ("HEADSCOPE_", "HF_", "TRANSFORMERS_")


@dataclass
class JobResult:
    """What became of one job.  status: "cached" (skipped), "done" or "failed"."""

    index: int
    label: str
    status: str
    key: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    error: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict:
        return {"index": self.index, "label": self.label, "status": self.status, "key": self.key,
                "attempts": self.attempts, "seconds": round(self.seconds, 3), "error": self.error,
                "info": self.info}


def _final(exc: BaseException) -> bool:
    """Errors that give the same answer every time: report, do not retry."""
    from core.errors import InputError, InterventionError, ModelUnavailable

    return isinstance(exc, (InputError, InterventionError, ModelUnavailable, TypeError, ValueError))


def run_batch(jobs: Iterable[Job | RunSpec], *, store=None, ray: bool = False, address: str | None = None,
              workers: int = DEFAULT_WORKERS, retries: int = DEFAULT_RETRIES,
              progress: Callable[[int, int, JobResult], None] | None = None,
              gpus_per_worker: float | None = None) -> list[JobResult]:
    """Run every job (a RunSpec counts as `CaptureJob(spec)`), skipping those already cached.

    ray=False runs them here, one after another; ray=True runs them on `workers` Ray actors, on a
    local instance started for the batch (`ray.init(num_cpus=workers)`, shut down after) or, with
    `address`, on that cluster (joined, left running).  `gpus_per_worker`: the GPUs each actor asks
    Ray for (default: none on the CPU; on a GPU the GPU count over the actors, at most 1).  Returns
    one JobResult per job, in order."""
    jobs = [CaptureJob(j) if isinstance(j, RunSpec) else j for j in jobs]
    if store is None:  # imported here: a batch of cached jobs never loads the capture stack
        from capture.api import default_store

        store = default_store()
    total = len(jobs)
    results: list[JobResult | None] = [None] * total
    done = 0

    def finish(result: JobResult) -> None:
        nonlocal done
        results[result.index] = result
        done += 1
        if progress is not None:
            progress(done, total, result)

    pending = []
    for i, job in enumerate(jobs):
        try:
            key = job.cached(store)
        except Exception as exc:  # noqa: BLE001 - a job that cannot even be looked up is a failed job
            finish(JobResult(i, _label(job), "failed", attempts=0, error=error_line(exc)))
            continue
        if key is not None:
            finish(JobResult(i, job.label(), "cached", key=key))
        else:
            pending.append(i)
    if pending:
        if ray or address:
            _run_on_ray(jobs, pending, store, address, workers, retries, finish, gpus_per_worker)
        else:
            for i in pending:
                finish(_run_here(i, jobs[i], store, retries))
    return [r for r in results if r is not None]


def _label(job) -> str:
    try:
        return job.label()
    except Exception:  # noqa: BLE001
        return repr(job)[:60]


def _run_here(index: int, job: Job, store, retries: int) -> JobResult:
    attempts, t0 = 0, time.perf_counter()
    while True:
        attempts += 1
        try:
            info = job.execute(store)
            return JobResult(index, job.label(), "done", key=info.get("key"), attempts=attempts,
                             seconds=time.perf_counter() - t0, info=info)
        except Exception as exc:  # noqa: BLE001 - reported per job, the batch goes on
            if _final(exc) or attempts > retries:
                return JobResult(index, _label(job), "failed", attempts=attempts,
                                 seconds=time.perf_counter() - t0, error=error_line(exc))


# ---- Ray -----------------------------------------------------------------------------------------

class _Worker:
    """A Ray actor: one process with its own loaded models and a handle on the shared cache."""

    def __init__(self, cache_dir: str, size_limit: int):
        from cache.store import Store

        self.store = Store(cache_dir, size_limit=size_limit)

    def execute(self, job) -> dict:
        return job.execute(self.store)

    def pid(self) -> int:
        return os.getpid()


def worker_env() -> dict[str, str]:
    """Environment variables a worker gets: this checkout on PYTHONPATH, HeadScope's and HF's settings."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return env


def start_ray(address: str | None = None, workers: int = DEFAULT_WORKERS) -> bool:
    """Connect to Ray (a local instance with `workers` CPUs, or the cluster at `address`); returns
    True if this call started or joined it (and so should shut it down), False if already connected."""
    try:
        import ray
    except ImportError as exc:
        from core.errors import InputError

        raise InputError("Ray is not installed in this environment; `pip install ray==2.60.0` (requirements.txt) "
                         "or run the batch without --ray.") from exc
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": worker_env()}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env,
                 object_store_memory=OBJECT_STORE_BYTES, configure_logging=False)
    return True


def _gpu_share(n_actors: int, gpus_per_worker: float | None) -> float:
    """GPUs each actor asks Ray for: as given, else none on the CPU, else Ray's GPUs over the actors (so
    every actor can start), at most one each."""
    from capture.engine.device import device_name

    if gpus_per_worker is not None or device_name() == "cpu":
        return float(gpus_per_worker or 0.0)
    import ray

    return min(1.0, float(ray.cluster_resources().get("GPU", 0)) / n_actors)


def _run_on_ray(jobs: list, pending: list[int], store, address: str | None, workers: int, retries: int,
                finish: Callable[[JobResult], None], gpus_per_worker: float | None = None) -> None:
    started = start_ray(address, workers)
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    try:
        n_actors = max(1, min(workers, len(pending)))
        actor_cls = ray.remote(num_cpus=1, num_gpus=_gpu_share(n_actors, gpus_per_worker), max_restarts=1,
                               max_task_retries=0)(_Worker)
        actors = [actor_cls.remote(str(store.directory), int(store.size_limit)) for _ in range(n_actors)]
        queue = [(i, 1) for i in pending]  # (job index, attempt)
        started_at: dict[int, float] = {}
        running: dict = {}  # future -> (index, attempt, actor)
        idle = list(actors)
        while queue or running:
            while queue and idle:
                i, attempt = queue.pop(0)
                actor = idle.pop(0)
                started_at.setdefault(i, time.perf_counter())
                running[actor.execute.remote(jobs[i])] = (i, attempt, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            future = ready[0]
            i, attempt, actor = running.pop(future)
            idle.append(actor)
            seconds = time.perf_counter() - started_at[i]
            try:
                info = ray.get(future)
                finish(JobResult(i, jobs[i].label(), "done", key=info.get("key"), attempts=attempt,
                                 seconds=seconds, info=info))
                continue
            except RayTaskError as exc:  # the job raised inside the worker
                cause = getattr(exc, "cause", None) or exc
                error, final = error_line(cause), _final(cause)
            except RayActorError as exc:  # the worker died (restarted once by Ray)
                error, final = f"worker died: {error_line(exc)}", False
            except Exception as exc:  # noqa: BLE001
                error, final = error_line(exc), False
            if final or attempt > retries:
                finish(JobResult(i, _label(jobs[i]), "failed", attempts=attempt, seconds=seconds, error=error))
            else:
                queue.append((i, attempt + 1))
        for actor in actors:
            ray.kill(actor)
    finally:
        if started:
            ray.shutdown()


__all__ = ["JobResult", "run_batch", "start_ray", "worker_env"]
