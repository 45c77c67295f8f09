"""A patching sweep split by layers (probes.split, issue 24 item 2 "on Ray for big sweeps") on SmolLM2's IOI
prompt pair: the parts merged equal one whole sweep exactly, in-process and on two Ray actors; the merged
result is stored under the whole sweep's key (the pages find it); the CLI's --parts; bad splits are one
sentence."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analytics.attribution import Patching
from cache.store import Store
from capture import registry
from conftest import cache_with_models
from core import probe_results as stored
from core.errors import InputError
from probes.runner import run_probe
from probes.split import layer_parts, merge_patched, split_sweep

ROOT = Path(__file__).resolve().parents[2]
FEW_LAYERS = {"layers": list(range(20, 30))}  # the whole-sweep reference over the last 10 layers


@pytest.fixture(scope="module")
def whole(tmp_path_factory, smollm2):
    """The default IOI sweep computed in one process, in a store of its own."""
    store = Store(tmp_path_factory.mktemp("whole"))
    yield Patching(run_probe("patching", "smollm2", {}, store=store))
    store.close()


def test_layer_parts_cover_every_layer_once():
    assert layer_parts(30, 4) == [tuple(range(0, 8)), tuple(range(8, 15)), tuple(range(15, 22)), tuple(range(22, 30))]
    assert layer_parts(3, 8) == [(0,), (1,), (2,)]  # no empty part
    with pytest.raises(InputError):
        layer_parts(30, 0)
    a, b = np.full((3, 2), np.nan), np.full((3, 2), np.nan)
    a[0], b[1:] = 1.0, 2.0
    np.testing.assert_array_equal(merge_patched([a, b]), [[1, 1], [2, 2], [2, 2]])
    with pytest.raises(ValueError, match="same head"):
        merge_patched([a, a])


def test_split_in_process_equals_the_whole_sweep_and_is_stored_as_it(whole, tmp_path):
    store = Store(tmp_path / "split")
    merged = Patching(split_sweep("patching", "smollm2", {}, parts=3, store=store))
    np.testing.assert_allclose(merged.patched, whole.patched, atol=1e-5)
    assert np.isfinite(merged.patched).all()
    assert merged.clean == pytest.approx(whole.clean, abs=1e-5)
    assert merged.corrupted == pytest.approx(whole.corrupted, abs=1e-5)
    assert merged.result.summary["top"][:5] == whole.result.summary["top"][:5]
    assert len(merged.result.record["parts"]) == 3
    # the whole sweep's key: run_probe (the pages' reader) finds it without computing anything
    found = stored.find(store, registry.revision("smollm2"), "patching", {})
    assert found is not None and found.key == merged.result.key
    assert run_probe("patching", "smollm2", {}, store=store).record["parts"] == merged.result.record["parts"]
    store.close()


def test_split_on_ray_equals_the_whole_sweep(whole, tmp_path):
    pytest.importorskip("ray")
    import ray

    store = Store(tmp_path / "ray")
    merged = Patching(split_sweep("patching", "smollm2", {}, parts=2, store=store, ray=True, workers=2))
    np.testing.assert_allclose(merged.patched, whole.patched, atol=1e-5)
    assert not ray.is_initialized()  # the local instance was shut down after the batch
    store.close()


@pytest.mark.parametrize("params, sentence", [
    ({"layers": [3]}, "covers every layer"),
    ({"sender": [20, 0]}, "does not split by layers"),
])
def test_bad_splits_are_one_sentence(params, sentence, tmp_path):
    with pytest.raises(InputError, match=sentence):
        split_sweep("patching", "smollm2", params, parts=2, store=Store(tmp_path / "bad"))
    with pytest.raises(InputError, match="Only the patching sweeps"):
        split_sweep("ablation", "smollm2", {}, parts=2, store=Store(tmp_path / "bad"))


def test_cli_parts(tmp_path, smollm2):
    env = dict(os.environ, HEADSCOPE_CACHE_DIR=str(cache_with_models(tmp_path / "cache")), HF_HUB_OFFLINE="1")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "headscope", "probe", "patching", "--model", "smollm2", *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    ok = cli("--parts", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "probe patching on smollm2: key" in ok.stdout and "top:" in ok.stdout
    layers = cli("--layers", *map(str, FEW_LAYERS["layers"]), "--parts", "2")
    assert layers.returncode != 0 and "covers every layer" in layers.stderr and "Traceback" not in layers.stderr
    both = cli("--parts", "2", "--batch", "4")
    assert both.returncode != 0 and "do not go together" in both.stderr and "Traceback" not in both.stderr
