"""Run everything the Home page's recipes read (pages/recipes.py): their captures, the probes they need and
the pattern atlas, into the cache; then print each recipe's numbers as the Home page shows them (the README
table).  Already cached work is read, not rerun.  Usage: .venv/bin/python bench/recipes.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace

from common import ROOT, table


def prepare(name: str) -> None:
    """Compute what recipe `name` reads."""
    import capture
    import probes
    from capture import presets
    from pages import recipes as R

    if name == "retrieval":
        probes.run_probe("needle", "smollm2")
        capture.run(R.needle_spec())
        for random in (False, True):
            capture.run(replace(R.needle_spec(), intervention=R.masking(random=random)))
    elif name == "act":
        base = capture.run(R.act_spec())
        capture.run(replace(R.act_spec(), intervention=presets.act(base.meta)))
    elif name == "sink_alpha":
        capture.run(capture.RunSpec(model="smollm2", prompt=R.SINK_PROMPT))
    elif name == "induction":
        probes.run_probe("patterns", "smollm2")
    elif name == "duo":
        probes.run_probe("duo", "smollm2")
    elif name == "registers":
        probes.vit_token_norms(capture.run(capture.RunSpec(model="dinov2-s", image="cat")))
    elif name == "gaze":
        capture.run(R.vlm_spec())
    elif name == "refam":
        capture.run(R.dit_spec())
        capture.run(R.dit_spec(R.softpag()))
    elif name == "patterns":
        from analytics.patterns import AtlasParams

        probes.build_atlas([capture.run(spec) for spec in R.atlas_specs()], AtlasParams())
    elif name == "ioi":
        probes.run_probe("patching", "smollm2")


def main() -> None:
    from pages.recipes import RECIPES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=[r.name for r in RECIPES])
    args = parser.parse_args()
    rows = []
    for recipe in RECIPES:
        if recipe.name not in args.only:
            continue
        t0 = time.perf_counter()
        prepare(recipe.name)
        took = time.perf_counter() - t0
        print(f"{recipe.name}: ready in {took:.0f} s", flush=True)
        rows.append([recipe.title, recipe.numbers() or "not measured", f"{took:.0f}"])
    print(table(["recipe", "measured here (pages/recipes.py)", "s to prepare"], rows))


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    main()
