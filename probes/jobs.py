"""The jobs a batch runs (probes.batch.run_batch) and the batch file they are read from.

    CaptureJob(RunSpec(model="smollm2", prompt="..."))          # one capture (capture.api.run)
    ProbeJob("needle", "smollm2", {"lengths": [512]})            # one probe (probes.runner.run_probe)
    sweep("ablation", ["smollm2", "./pythia-160m"], {"mode": ["zero", "mean"]})   # one ProbeJob per cell

A job is any object with `label()`, `cached(store) -> key | None` and `execute(store) -> dict` (the dict
must hold "key").  Jobs travel to Ray actors by pickling, so a job class must be importable on the
workers.  A batch file (`python -m headscope batch FILE`) is JSON lines: a RunSpec-like object, or
{"probe": ..., "model": ..., "params": {...}}; a bad line is reported and the others run.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

from core.types import RunSpec


class Job(Protocol):
    def label(self) -> str: ...

    def cached(self, store) -> str | None: ...

    def execute(self, store) -> dict: ...


@dataclass(frozen=True)
class CaptureJob:
    """Capture one RunSpec (capture.api.run)."""

    spec: RunSpec

    def label(self) -> str:
        prompt = " ".join(self.spec.prompt.split())
        return f"{self.spec.model}: {prompt[:40]}{'…' if len(prompt) > 40 else ''}"

    def cached(self, store) -> str | None:
        from capture.api import cached

        found = cached(self.spec, store)
        return None if found is None else found.key

    def execute(self, store) -> dict:
        from capture.api import run

        capture = run(self.spec, store=store)
        return {"key": capture.key, "n_tokens": capture.n_tokens, "layout": capture.layout,
                "text": capture.output.text, "from_cache": capture.from_cache,
                "peak_mb": capture.timings.get("peak_mb")}


HEADHUNTER = "headhunter"  # probes.headhunter: its own parameters and key (a DiT probe, not run_probe's)


@dataclass(frozen=True)
class ProbeJob:
    """Run one probe (probes.runner.run_probe, or "headhunter": probes.headhunter.headhunter) with the given
    parameters."""

    probe: str
    model: str = "smollm2"
    params: tuple[tuple[str, Any], ...] = ()  # (name, value) pairs; a dict is accepted and converted

    def __post_init__(self) -> None:
        if isinstance(self.params, dict):
            items = tuple((k, _frozen(v)) for k, v in sorted(self.params.items()))
            object.__setattr__(self, "params", items)

    def label(self) -> str:
        given = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in self.params)
        return f"probe {self.probe} on {self.model}" + (f" ({given})" if given else "")

    def _params(self):
        from core import probe_results as stored
        from probes import headhunter as hunt

        params = dict(self.params)
        return hunt.HeadHunterParams(**params) if self.probe == HEADHUNTER else stored.params_of(self.probe, params)

    def cached(self, store) -> str | None:
        from capture import registry
        from core import probe_results as stored
        from probes import headhunter as hunt

        found = hunt.find(store, self.model, self._params()) if self.probe == HEADHUNTER else \
            stored.find(store, registry.revision(self.model), self.probe, self._params())
        return None if found is None else found.key

    def execute(self, store) -> dict:
        if self.probe == HEADHUNTER:
            from probes.headhunter import headhunter

            found = headhunter(self.model, self._params(), store)
            return {"key": found.key, "heads": [list(h) for h in found.heads], "best": found.best}
        from probes.runner import run_probe

        result = run_probe(self.probe, self.model, self._params(), store)
        return {"key": result.key, "seconds": result.record.get("seconds")}


def _frozen(value: Any) -> Any:
    """Lists (from JSON) as tuples, nested too: a job stays hashable and its parameters key stably."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def sweep(probe: str, models: str | Iterable[str], grid: dict[str, Iterable] | None = None,
          **fixed: Any) -> list[ProbeJob]:
    """One ProbeJob per (model, combination of the `grid` values: name -> values), each with the `fixed`
    parameters, models first.  One sentence for no model, an empty grid axis or an unknown parameter."""
    from core.errors import InputError

    models = [models] if isinstance(models, str) else list(models)
    grid = {name: list(values) for name, values in (grid or {}).items()}
    if not models or not all(grid.values()):
        raise InputError(f"A {probe} sweep needs at least one model and one value for each grid parameter.")
    jobs = [ProbeJob(probe, model, {**fixed, **dict(zip(grid, values))})
            for model in models for values in itertools.product(*grid.values())]
    try:
        jobs[0]._params()  # a parameter the probe lacks: refused before anything runs
    except (TypeError, ValueError) as exc:
        raise InputError(f"The {probe} sweep cannot be made: {str(exc).rstrip('.')}.") from exc
    return jobs


def error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ---- reading a batch file --------------------------------------------------------------------------

def job_from_json(data: Any) -> Job:
    """One line of a batch file: a RunSpec-like object ({"model", "prompt", "max_new_tokens", ...}), or a
    probe ({"probe": "needle", "model": "smollm2", "params": {...}})."""
    if not isinstance(data, dict):
        raise ValueError("each line must be a JSON object")
    if "probe" in data:
        unknown = set(data) - {"probe", "model", "params"}
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))} for a probe")
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError("params must be an object")
        default = "shapes-dit" if data["probe"] == HEADHUNTER else "smollm2"
        return ProbeJob(str(data["probe"]), str(data.get("model", default)), params)
    fields = set(RunSpec.__dataclass_fields__)
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}; a line takes {', '.join(sorted(fields))}")
    data = dict(data)
    data.setdefault("model", "smollm2")
    return CaptureJob(RunSpec.from_json(data))


def read_jobs(path: str | os.PathLike) -> list[tuple[int, Job | None, str | None]]:
    """(line number, job or None, error or None) for each non-blank, non-comment line of a JSONL file."""
    import json

    out = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                out.append((number, job_from_json(json.loads(text)), None))
            except Exception as exc:  # noqa: BLE001 - a bad line is reported, the others run
                out.append((number, None, f"line {number}: {error_line(exc)}"))
    return out


__all__ = ["CaptureJob", "Job", "ProbeJob", "error_line", "job_from_json", "read_jobs", "sweep"]
