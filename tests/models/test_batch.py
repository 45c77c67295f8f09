"""Batch work (probes.batch): in-process and on a local Ray instance with 2 workers, same results.

Ray starts with num_cpus=2, no dashboard and no log forwarding; its two actors each load SmolLM2
once and run every job they are given.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cache.store import Store
from capture.api import load_capture
from core.types import RunSpec
from probes.batch import JobResult, run_batch
from probes.jobs import CaptureJob, job_from_json, read_jobs

ROOT = Path(__file__).resolve().parents[2]
SPECS = [
    RunSpec(model="smollm2", prompt="The capital of France is"),
    RunSpec(model="smollm2", prompt="Once upon a time, in a small village,", max_new_tokens=3),
    RunSpec(model="smollm2", prompt="def add(a, b):\n    return", max_new_tokens=2),
]
EMPTY = RunSpec(model="smollm2", prompt="   ")  # invalid input: reported, not retried


@dataclass(frozen=True)
class FlakyJob:
    """Fails on its first attempt (a marker file remembers it across processes), then succeeds."""

    marker: str

    def label(self) -> str:
        return "flaky"

    def cached(self, store) -> str | None:
        return None

    def execute(self, store) -> dict:
        if not os.path.exists(self.marker):
            Path(self.marker).write_text("tried")
            raise RuntimeError("transient failure")
        return {"key": "flaky-done"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("batch")
    here, ray_store = Store(root / "here", size_limit=2**30), Store(root / "ray", size_limit=2**30)
    yield here, ray_store
    here.close()
    ray_store.close()


@pytest.fixture(scope="module")
def in_process(stores, tmp_path_factory):
    seen = []
    marker = tmp_path_factory.mktemp("flaky-here") / "marker"
    results = run_batch([*SPECS, EMPTY, FlakyJob(str(marker))], store=stores[0],
                        progress=lambda done, total, r: seen.append((done, total, r.status)))
    return results, seen


def test_in_process_batch(in_process):
    results, seen = in_process
    assert [r.status for r in results] == ["done", "done", "done", "failed", "done"]
    assert [d for d, _, _ in seen] == [1, 2, 3, 4, 5] and all(t == 5 for _, t, _ in seen)
    empty = results[3]
    assert empty.attempts == 1 and "prompt is empty" in empty.error  # invalid input: not retried
    flaky = results[4]
    assert flaky.attempts == 2 and flaky.key == "flaky-done"  # failed once, retried, done
    assert all(r.key and len(r.key) == 20 for r in results[:3])


def test_rerun_skips_cached(stores, in_process):
    results = run_batch(SPECS, store=stores[0])
    assert [r.status for r in results] == ["cached"] * 3
    assert [r.key for r in results] == [r.key for r in in_process[0][:3]]
    assert all(r.attempts == 0 for r in results)


def test_ray_batch_equals_in_process(stores, in_process, tmp_path):
    pytest.importorskip("ray")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # FlakyJob travels by value
    here, ray_store = stores
    marker = tmp_path / "marker"
    seen = []
    results = run_batch([*SPECS, EMPTY, FlakyJob(str(marker))], store=ray_store, ray=True, workers=2,
                        progress=lambda done, total, r: seen.append(r.index))
    assert [r.status for r in results] == ["done", "done", "done", "failed", "done"], [r.error for r in results]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert results[3].attempts == 1 and "prompt is empty" in results[3].error
    assert results[4].attempts == 2
    mine = in_process[0]
    for a, b in zip(mine[:3], results[:3]):
        assert a.key == b.key
        ca, cb = load_capture(a.key, here), load_capture(b.key, ray_store)
        assert cb is not None and cb.layout == ca.layout
        assert cb.output.token_ids == ca.output.token_ids and cb.output.text == ca.output.text
        assert [t for t, _ in cb.output.next_top] == [t for t, _ in ca.output.next_top]
        for layer in (0, 15, 29):
            assert np.abs(ca.attention(layer).astype(np.float32) - cb.attention(layer).astype(np.float32)).max() <= 1e-3
    # the workers ran in other processes (the actors keep their models), and Ray was shut down again
    assert all(r.info.get("from_cache") is False for r in results[:3])
    import ray as ray_module

    assert not ray_module.is_initialized()
    again = run_batch(SPECS, store=ray_store, ray=True)  # all cached: Ray is not even started
    assert [r.status for r in again] == ["cached"] * 3


def test_batch_file_parsing(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join([
        json.dumps({"prompt": "hello"}),
        "# a comment",
        "",
        json.dumps({"model": "smollm2", "prompt": "x", "max_new_tokens": 2,
                    "intervention": {"edits": [{"layer": 1, "head": 2, "op": "scale", "value": 0.0}]}}),
        "{not json",
        json.dumps({"prompt": "x", "colour": "red"}),
        json.dumps({"probe": "patterns", "params": {"period": 16}}),
    ]))
    lines = read_jobs(path)
    assert [n for n, _, _ in lines] == [1, 4, 5, 6, 7]
    assert isinstance(lines[0][1], CaptureJob) and lines[0][1].spec.model == "smollm2"
    assert lines[1][1].spec.intervention.edits[0].op == "scale"
    assert lines[2][1] is None and "line 5" in lines[2][2]
    assert lines[3][1] is None and "colour" in lines[3][2]
    assert lines[4][1].probe == "patterns" and dict(lines[4][1].params) == {"period": 16}
    with pytest.raises(ValueError):
        job_from_json(["not", "an", "object"])


def test_cli_batch(tmp_path, stores, in_process):
    from conftest import cache_with_models

    cache_root = cache_with_models(tmp_path / "cache")
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(SPECS[0].to_json()) + "\n" + json.dumps({"prompt": ""}) + "\n{oops\n")
    env = dict(os.environ, HEADSCOPE_CACHE_DIR=str(cache_root), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "headscope", "batch", str(path), "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]  # one job failed: reported, not fatal
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["line"], r["status"]) for r in rows] == [(1, "done"), (2, "failed"), (3, "failed")]
    assert rows[0]["key"] == in_process[0][0].key
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "headscope", "batch", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert "1 done" not in proc.stdout and "0 done, 1 cached, 2 failed" in proc.stdout


def test_job_result_json():
    r = JobResult(0, "x", "failed", attempts=2, seconds=1.23456, error="E: boom")
    assert r.to_json()["seconds"] == 1.235 and not r.ok
