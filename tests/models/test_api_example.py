"""The README's "Python API" example runs as written (capture, a metric, an intervention, before | after)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import cache_with_models

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- python-api:[^\n]*-->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md has no python-api block"
    return found.group(1)


def test_readme_python_api_example_runs(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "HEADSCOPE_CACHE_DIR": str(cache_with_models(tmp_path / "cache"))}  # a fresh cache: the model runs
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[1].startswith("L") and " ablated: " in lines[1]
    assert lines[2].startswith("largest change in layer ")
    assert float(lines[2].rsplit(" ", 1)[1]) > 0  # the head's edit reaches the next layer's maps
