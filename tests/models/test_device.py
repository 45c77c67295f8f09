"""Devices and dtypes (issue 20): HEADSCOPE_DEVICE / HEADSCOPE_DTYPE, bfloat16 on the CPU, the device path
forced on the CPU, a CUDA-only check skipped with its reason, and bad settings or models refused in one
sentence with nothing cached.  Tiny random models built here (no hub)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from test_text_architectures import PROMPT, SMALL, tiny_tokenizer
from transformers import AutoModelForCausalLM

from capture import registry
from capture.api import run
from capture.engine import device
from core.errors import InputError, ModelUnavailable
from core.types import RunSpec

NEW = 4
BF16_ATOL = 1.6e-2  # bfloat16 keeps 8 significant bits: a weight of 1 is off by up to 2^-8 (and scores round too)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tf.LlamaConfig(**SMALL, num_key_value_heads=2)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def eager_maps(folder: str, ids: list[int], dtype: torch.dtype) -> list[np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval()
    t = torch.tensor([ids])
    with torch.inference_mode():
        out = model(input_ids=t, attention_mask=torch.ones_like(t), output_attentions=True)
    return [a[0].float().numpy() for a in out.attentions]


def plain_generate(folder: str, prompt_ids: list[int], dtype: torch.dtype) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    t = torch.tensor([prompt_ids])
    with torch.inference_mode():
        return model.generate(input_ids=t, attention_mask=torch.ones_like(t), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0)[0].tolist()


def test_settings_resolve_on_this_machine(monkeypatch):
    monkeypatch.delenv(device.DEVICE_ENV, raising=False)
    monkeypatch.delenv(device.DTYPE_ENV, raising=False)
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert device.device_name() == expected
    assert device.dtype_name() == ("float32" if expected == "cpu" else "bfloat16")
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    assert (device.device_name(), device.dtype_name()) == ("cpu", "float32")
    assert device.keyed_revision("local:abc") == "local:abc"  # every float32 key stays as it was
    monkeypatch.setenv(device.DTYPE_ENV, "bfloat16")
    assert device.keyed_revision("local:abc") == "local:abc|bfloat16"
    assert device.placement() == {"dtype": torch.bfloat16}


def test_resolving_the_settings_on_the_cpu_imports_no_torch(tmp_path):
    """A capture served from the cache never loads torch: the settings are read without it (no NVIDIA driver)."""
    import subprocess

    code = ("import sys; from capture.engine import device; "
            "print(device.device_name(), device.dtype_name(), 'torch' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           device.DEVICE_ENV: "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["cpu", "float32", "False"]


def test_bfloat16_on_the_cpu(llama, store, monkeypatch):
    """Maps equal eager bfloat16 maps to bfloat16 tolerance, generation equals plain bfloat16 `generate`,
    and the capture has its own key (the float32 one is not served for it)."""
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    spec = RunSpec(model=llama, prompt=PROMPT, max_new_tokens=NEW)
    full = run(spec, store=store)
    monkeypatch.setenv(device.DTYPE_ENV, "bfloat16")
    half = run(spec, store=store)
    assert not half.from_cache and half.key != full.key
    assert registry.load(llama).model.dtype == torch.bfloat16
    n_prompt = len(half.spans["prompt"])
    assert half.output.token_ids == plain_generate(llama, half.output.token_ids[:n_prompt], torch.bfloat16)
    worst = 0.0
    for layer, expected in enumerate(eager_maps(llama, half.output.token_ids, torch.bfloat16)):
        got = half.attention(layer).astype(np.float32)
        worst = max(worst, float(np.abs(got - expected).max()))
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=2e-3)  # softmax in float32: rows still sum to 1
    print(f"bfloat16 on the CPU: max |capture - eager| = {worst:.2e}")
    assert worst <= BF16_ATOL
    assert run(spec, store=store).from_cache


def test_device_path_forced_on_the_cpu_equals_the_kernel_path(llama, store, monkeypatch):
    """HEADSCOPE_DEVICE=cpu without the CPU-only fast paths (fused kernel, packed linears): the recorded pass
    takes the torch ops a GPU takes (the recorder's buffers where the weights are, to_host at the end of a
    layer) and gives the kernel path's maps."""
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    spec = RunSpec(model=llama, prompt=PROMPT, max_new_tokens=NEW)
    kernel = run(spec, store=store)
    store.evict(kernel.key)
    monkeypatch.setenv("HEADSCOPE_FUSED", "0")
    monkeypatch.setenv("HEADSCOPE_PACKED", "0")
    from capture.engine import fused

    monkeypatch.setattr(fused, "_state", {})  # re-read HEADSCOPE_FUSED
    torch_ops = run(spec, store=store)
    assert not torch_ops.from_cache and torch_ops.key == kernel.key
    assert torch_ops.output.token_ids == kernel.output.token_ids
    for layer in range(torch_ops.meta.n_layers):
        np.testing.assert_allclose(torch_ops.attention(layer).astype(np.float32),
                                   kernel.attention(layer).astype(np.float32), atol=1e-3, rtol=0)
    monkeypatch.setattr(fused, "_state", {})


def test_to_host_of_a_cpu_tensor_is_a_view():
    t = torch.arange(6, dtype=torch.float16).view(2, 3)
    host = device.to_host(t)
    assert isinstance(host, np.ndarray) and np.shares_memory(host, t.numpy())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: this machine has none (torch.cuda.is_available() "
                    "is False); bench/gpu.py and this test run where one is")
def test_cuda_capture_equals_the_cpu(llama, store, monkeypatch):
    """On a GPU in float32: the maps equal the CPU's, generation equals plain `generate`, the layers came back
    through pinned memory; in bfloat16 (the GPU's default) the maps are within bfloat16 tolerance."""
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    cpu = run(RunSpec(model=llama, prompt=PROMPT, max_new_tokens=NEW), store=store)
    monkeypatch.setenv(device.DEVICE_ENV, "cuda")
    monkeypatch.setenv(device.DTYPE_ENV, "float32")
    gpu = run(RunSpec(model=llama, prompt=PROMPT, max_new_tokens=NEW), store=store)
    assert registry.load(llama).model.device.type == "cuda"
    assert gpu.key == cpu.key and gpu.from_cache  # float32 on any device: the same key
    store.evict(gpu.key)
    gpu = run(RunSpec(model=llama, prompt=PROMPT, max_new_tokens=NEW), store=store)
    assert gpu.output.token_ids == cpu.output.token_ids
    assert "gpu_peak_mb" in gpu.timings
    for layer in range(gpu.meta.n_layers):
        np.testing.assert_allclose(gpu.attention(layer).astype(np.float32), cpu.attention(layer).astype(np.float32),
                                   atol=1e-3, rtol=0)
    monkeypatch.setenv(device.DTYPE_ENV, "auto")
    half = run(RunSpec(model=llama, prompt=PROMPT, max_new_tokens=NEW), store=store)
    for layer in range(half.meta.n_layers):
        np.testing.assert_allclose(half.attention(layer).astype(np.float32), cpu.attention(layer).astype(np.float32),
                                   atol=BF16_ATOL * 2, rtol=0)


# ---- bad input: one sentence each, nothing cached ------------------------------------------------------

def one_sentence(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text and text.rstrip().endswith("."), text
    assert len(text) < 400, text
    return text


@pytest.mark.parametrize("setting,value,words", [
    (device.DEVICE_ENV, "tpu", "not a device"),
    (device.DEVICE_ENV, "cuda:x", "not a device"),
    (device.DTYPE_ENV, "int8", "not a dtype"),
    (device.DTYPE_ENV, "float16", "needs a GPU"),  # on the CPU
] + ([] if torch.cuda.is_available() else [(device.DEVICE_ENV, "cuda", "has none")]))
def test_bad_settings_are_one_sentence_and_nothing_is_cached(llama, store, monkeypatch, setting, value, words):
    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    monkeypatch.setenv(setting, value)
    with pytest.raises(InputError) as info:
        run(RunSpec(model=llama, prompt=PROMPT), store=store)
    assert words in one_sentence(info.value)
    assert store.keys() == []


def test_a_model_that_needs_remote_code_is_refused(tmp_path, store):
    """A folder whose architecture exists only as code in its repository (auto_map): refused, never run."""
    config = tf.LlamaConfig(**SMALL).to_dict()
    config.update(model_type="my-remote-llm", architectures=["MyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelUnavailable) as info:
        run(RunSpec(model=str(tmp_path), prompt=PROMPT), store=store)
    assert "custom code" in one_sentence(info.value)
    assert store.keys() == []



def test_cli_flags(llama, monkeypatch, capsys, tmp_path):
    """--device / --dtype set HEADSCOPE_DEVICE / HEADSCOPE_DTYPE for the command; a bad one is one sentence."""
    from headscope.cli import main

    monkeypatch.setenv("HEADSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(device.DEVICE_ENV, "auto")
    monkeypatch.setenv(device.DTYPE_ENV, "auto")
    monkeypatch.setattr("capture.api._default_store", None)
    assert main(["run", "--model", llama, "--prompt", PROMPT, "--device", "tpu"]) == 2
    assert "not a device" in one_sentence(capsys.readouterr().err.removeprefix("error: ").strip())
    assert main(["--device", "cpu", "run", "--model", llama, "--prompt", PROMPT, "--dtype", "bfloat16", "--json"]) == 0
    ran = json.loads(capsys.readouterr().out)
    assert ran["key"] == RunSpec(model=llama, prompt=PROMPT).key(registry.revision(llama))
    assert registry.revision(llama).endswith("|bfloat16")


# ---- probe sweeps (probes.jobs.sweep): one job per (model, parameter set), on the batch path ----------

def test_probe_sweep_jobs(llama, store, monkeypatch):
    """An ablation sweep over two modes of a tiny model runs as two jobs through run_batch, each cached on its
    own; a rerun skips both; HeadHunter-lite and needle grids make their jobs the same way; a bad grid is
    one sentence before anything runs."""
    from probes.batch import run_batch
    from probes.jobs import ProbeJob, sweep

    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    jobs = sweep("ablation", [llama], {"mode": ["zero", "uniform"]}, prompt=PROMPT, score_last=4)
    assert [dict(j.params)["mode"] for j in jobs] == ["zero", "uniform"]
    first = run_batch(jobs, store=store)
    assert [r.status for r in first] == ["done", "done"], [r.error for r in first]
    assert len({r.key for r in first}) == 2
    assert [r.status for r in run_batch(jobs, store=store)] == ["cached", "cached"]
    needle = sweep("needle", ["smollm2", llama], {"lengths": [[256], [512]], "depths": [[0.0, 50.0]]})
    assert len(needle) == 4 and dict(needle[3].params) == {"depths": (0.0, 50.0), "lengths": (512,)}
    hunt = sweep("headhunter", "shapes-dit", {"objective": ["colour", "shape"]}, steps=4)
    assert [j._params().objective for j in hunt] == ["colour", "shape"] and hunt[0]._params().steps == 4
    assert hash(ProbeJob("needle", "smollm2", {"lengths": [256]}))  # JSON lists become tuples: hashable
    for bad in ({"mode": []}, {"no_such": [1]}):
        with pytest.raises(InputError) as info:
            sweep("ablation", [llama], bad)
        one_sentence(info.value)


def test_probe_sweep_on_ray_lands_in_the_same_cache(llama, store, monkeypatch):
    """The same sweep on two local Ray actors: the results are the in-process ones, in the same cache."""
    pytest.importorskip("ray")
    from probes.batch import run_batch
    from probes.jobs import sweep

    monkeypatch.setenv(device.DEVICE_ENV, "cpu")
    jobs = sweep("ablation", [llama], {"mode": ["zero", "mean"]}, prompt=PROMPT, score_last=4)
    here = run_batch(jobs[:1], store=store)
    on_ray = run_batch(jobs, store=store, ray=True, workers=2)
    assert [r.status for r in on_ray] == ["cached", "done"], [r.error for r in on_ray]
    assert on_ray[0].key == here[0].key
    from core import probe_results as stored

    found = stored.find(store, registry.revision(llama), "ablation", jobs[1]._params())
    assert found is not None and found.key == on_ray[1].key
