"""The command line, end to end in subprocesses: python -m headscope run / ls / export, and its errors."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache.store import Store
from capture.api import load_capture
from conftest import cache_with_models
from core.keys import is_key

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory, smollm2) -> Path:
    """A fresh cache directory whose models/ is the converted SmolLM2 (converting takes ~20 s)."""
    return cache_with_models(tmp_path_factory.mktemp("cli-cache"))


def cli(cache_root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HEADSCOPE_CACHE_DIR=str(cache_root), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "headscope", *args], cwd=ROOT, env=env, capture_output=True,
                          timeout=timeout)
    # decoded by hand: text=True would turn the progress bar's carriage returns into newlines
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def shown_lines(stream: str) -> list[str]:
    """What a terminal shows: each line as left by its last carriage return (progress bars redraw with \\r)."""
    return [line.rsplit("\r", 1)[-1].strip() for line in stream.split("\n") if line.rsplit("\r", 1)[-1].strip()]


@pytest.fixture(scope="module")
def ran(cache_root) -> dict:
    proc = cli(cache_root, "run", "--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def stored(cache_root, ran):
    store = Store(cache_root)
    capture = load_capture(ran["key"], store)
    assert capture is not None
    yield capture
    store.close()


def test_run_json(ran, stored, smollm2):
    assert is_key(ran["key"]) and ran["from_cache"] is False
    assert (ran["model"], ran["family"], ran["n_layers"], ran["n_heads"], ran["n_kv_heads"], ran["head_dim"]) == \
        ("smollm2", "llama", 30, 9, 3, 64)
    n_prompt = len(smollm2.tokenizer(PROMPT)["input_ids"])
    assert ran["spans"] == {"prompt": [0, n_prompt], "response": [n_prompt, n_prompt + 3]}
    assert ran["n_tokens"] == len(ran["tokens"]) == n_prompt + 3
    assert len(ran["steps"]) == 3
    for step in ran["steps"]:
        assert step["logprob"] == step["top"][0][1] and step["token"] == step["top"][0][0]
    assert ran["tokens"][n_prompt:] == [s["token"] for s in ran["steps"]]
    # what it printed is what it stored
    assert stored.tokens == ran["tokens"] and stored.output.text == ran["text"]
    assert stored.spec.prompt == PROMPT and stored.spec.max_new_tokens == 3


def test_run_again_is_served_from_the_cache(cache_root, ran):
    proc = cli(cache_root, "run", "--model", "smollm2", "--prompt", PROMPT, "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(ran["text"] + "\n")
    out = proc.stdout.splitlines()
    assert any(line.startswith("model: smollm2 (llama), 30 layers x 9 heads (3 KV heads)") for line in out)
    assert f"key:   {ran['key']}  (from cache)" in out


def test_ls(cache_root, ran):
    proc = cli(cache_root, "ls", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert rows == [{"key": ran["key"], "model": "smollm2", "tokens": ran["n_tokens"], "prompt": PROMPT}]
    proc = cli(cache_root, "ls")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["key", "model", "tokens", "prompt"]
    assert lines[1].split()[:3] == [ran["key"], "smollm2", str(ran["n_tokens"])]
    assert len(lines) == 2


def test_ls_empty(tmp_path):
    proc = cli(tmp_path, "ls")
    assert proc.returncode == 0 and proc.stdout.startswith("no captures in ")
    proc = cli(tmp_path, "ls", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == []


def test_export_npy(cache_root, ran, stored, tmp_path):
    out = tmp_path / "map.npy"
    proc = cli(cache_root, "export", ran["key"], "--layer", "3", "--head", "2", "--format", "npy", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    got = np.load(out, allow_pickle=False)
    expected = stored.head(3, 2)
    assert got.dtype == expected.dtype == np.float16 and got.shape == (ran["n_tokens"],) * 2
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
    assert np.abs(got.astype(np.float32) - stored.head(3, 1)).max() > 0  # a different head differs


def test_export_csv(cache_root, ran, stored, tmp_path):
    out = tmp_path / "map.csv"
    proc = cli(cache_root, "export", ran["key"], "--layer", "29", "--head", "8", "--format", "csv", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    n = ran["n_tokens"]
    assert len(rows) == n + 1
    assert rows[0][1:] == [f"{i}:{t}" for i, t in enumerate(ran["tokens"])]
    assert [r[0] for r in rows[1:]] == [f"{i}:{t}" for i, t in enumerate(ran["tokens"])]
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    np.testing.assert_allclose(values, stored.head(29, 8).astype(np.float32), rtol=1e-5, atol=0)


def test_export_default_file_name(cache_root, ran, stored, tmp_path):
    env = dict(os.environ, HEADSCOPE_CACHE_DIR=str(cache_root), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "headscope", "export", ran["key"], "--layer", "0", "--head", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / f"{ran['key']}_L0_H0.npy"), stored.head(0, 0))


ERRORS = {
    "empty prompt": (["run", "--model", "smollm2", "--prompt", "", "--max-new-tokens", "3"], "prompt is empty"),
    "unknown model": (["run", "--model", "headscope-test/no-such-model-9f3c", "--prompt", "hi"], "no-such-model"),
    "missing folder": (["run", "--model", "/nonexistent/headscope/model", "--prompt", "hi"], "no model folder"),
    "negative tokens": (["run", "--prompt", "hi", "--max-new-tokens", "-1"], "max-new-tokens"),
    "bad key": (["export", "not-a-key", "--layer", "0", "--head", "0"], "not a capture key"),
    "absent key": (["export", "0" * 20, "--layer", "0", "--head", "0"], "No capture"),
    "layer out of range": (["export", "{key}", "--layer", "30", "--head", "0"], "outside this model"),
    "negative layer": (["export", "{key}", "--layer", "-1", "--head", "0"], "outside this model"),
    "head out of range": (["export", "{key}", "--layer", "0", "--head", "9"], "outside this model"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_exit_2(cache_root, ran, case):
    args, words = ERRORS[case]
    proc = cli(cache_root, *[a.format(key=ran["key"]) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    lines = shown_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and words in lines[0], lines[0]
    assert proc.stdout == ""
    # nothing half-made was left behind by a failed run
    store = Store(cache_root)
    try:
        assert store.keys() == [ran["key"]]
    finally:
        store.close()


def test_run_dit_with_seed_and_steps(cache_root):
    proc = cli(cache_root, "run", "--model", "shapes-dit", "--prompt", "a red circle at the top left", "--seed", "3",
               "--steps", "4", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["seed"] == 3 and out["sampling_steps"] == 4 and len(out["timesteps"]) == 4
    again = cli(cache_root, "run", "--model", "shapes-dit", "--prompt", "a red circle at the top left", "--seed", "3",
                "--steps", "4", "--json")
    assert json.loads(again.stdout)["key"] == out["key"] and json.loads(again.stdout)["from_cache"]
    for bad, message in ((["--steps", "500"], "Steps must be between 1 and 200"),
                         (["--seed", "-4"], "The seed must be a whole number")):
        proc = cli(cache_root, "run", "--model", "shapes-dit", "--prompt", "a red circle", *bad)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
