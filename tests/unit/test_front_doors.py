"""The two front doors (issue 19): `capture` and `probes` import without torch, and every name they list resolves."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_front_doors_import_without_torch():
    code = ("import sys, capture, probes; heavy = [m for m in ('torch', 'transformers', 'diffusers', 'streamlit') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_probes_name_resolves_and_none_shadows_a_module():
    import probes

    modules = {p.stem for p in (ROOT / "probes").glob("*.py")}
    for name in probes.__all__:
        assert name not in modules, f"probes.{name} names both a function and a module"
        assert not isinstance(getattr(probes, name), type(sys)), name


def test_every_capture_name_resolves():
    import capture

    for name in capture.__all__:
        assert getattr(capture, name) is not None, name
