"""Before | after accuracy of a VLM intervention over held-out shapes scenes.

For each of the first `n_scenes` held-out scenes (training.eval_vlm.held_out_scenes: captions never
drawn in training) and `questions_per_scene` of its questions (training.scenes.questions; the
absent-object presence question, answer "no", always among them: it measures hallucination), the
question is captured once (the answer before, and the maps and residual stream the intervention is
built from: capture.vlm_presets.for_capture), then answered again greedily with the intervention
active.  Captures go to a temporary store and are dropped as soon as they are used.

An answer is right when it equals the ground truth after stripping and lower-casing (as
training.eval_vlm's exact answers).  `gaze_pointing` measures, on the same kind of scenes, how often
the GIFT saliency peak falls in the asked object's box (analytics.vlm.pointing).
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field

import numpy as np

from capture.adapters import Progress, no_progress
from capture.types import RunSpec

N_SCENES = 10
QUESTIONS_PER_SCENE = 4
POINTING_KINDS = ("colour", "shape", "position", "presence")  # questions about one object that is there


@dataclass
class BatchRow:
    seed: int
    question: str
    kind: str  # training.scenes.QA.kind, "absent" for presence questions about an absent object
    expected: str
    before: str
    after: str
    edited: bool = True  # False: the method found nothing to edit on this input (after = before)

    @property
    def right_before(self) -> bool:
        return self.before.strip().lower() == self.expected

    @property
    def right_after(self) -> bool:
        return self.after.strip().lower() == self.expected


@dataclass
class BatchResult:
    method: str
    params: dict
    rows: list[BatchRow] = field(default_factory=list)

    def accuracy(self, kind: str | None = None) -> tuple[float, float, int]:
        """(before, after, n) over the rows of `kind` (None: all)."""
        rows = [r for r in self.rows if kind is None or r.kind == kind]
        if not rows:
            return float("nan"), float("nan"), 0
        return (float(np.mean([r.right_before for r in rows])), float(np.mean([r.right_after for r in rows])),
                len(rows))

    def kinds(self) -> list[str]:
        return sorted({r.kind for r in self.rows})


def batch_questions(n_scenes: int = N_SCENES, per_scene: int = QUESTIONS_PER_SCENE, seed: int = 0):
    """[(scene, QA, kind)]: per held-out scene, its absent-object question and per_scene - 1 others (seeded)."""
    from training import scenes
    from training.eval_vlm import held_out_scenes

    out = []
    for scene in held_out_scenes(n_scenes):
        qas = scenes.questions(scene)
        absent = [qa for qa in qas if qa.kind == "presence" and not qa.objects]
        rest = [qa for qa in qas if qa not in absent]
        rng = np.random.default_rng([scene.seed, seed, 5])
        picked = absent[:1] + [rest[int(i)] for i in rng.choice(len(rest), size=min(per_scene - len(absent[:1]),
                                                                                      len(rest)), replace=False)]
        out += [(scene, qa, "absent" if qa in absent else qa.kind) for qa in picked]
    return out


def _answer_with(handle, spec: RunSpec) -> str:
    """The greedy answer to `spec` with its intervention active (the capture's generation step only)."""
    from capture.adapters.vlm import VlmAdapter

    adapter = VlmAdapter(handle)
    inputs, spans = adapter.encode(spec)
    with handle.lock:
        new_ids, _ = adapter.generate(spec, inputs, spans, no_progress, 0.0)
    return adapter.tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def accuracy_change(model: str, method: str, params: dict | None = None, n_scenes: int = N_SCENES,
                    per_scene: int = QUESTIONS_PER_SCENE, max_new_tokens: int = 8,
                    progress: Progress = no_progress) -> BatchResult:
    """Exact-answer accuracy before and after `method` ("var", "gift", "vhr", "mask" with params["heads"])."""
    from cache.store import Store
    from capture import registry, vlm_presets
    from capture.interventions import InterventionError
    from capture.run import run

    params = dict(params or {})
    heads = params.pop("heads", None)
    handle = registry.load(model)
    result = BatchResult(method=method, params={**params, **({"heads": heads} if heads else {})})
    jobs = batch_questions(n_scenes, per_scene)
    with tempfile.TemporaryDirectory(prefix="headscope-vlm-batch-") as folder:
        store = Store(folder, size_limit=4 * 2**30)
        try:
            for i, (scene, qa, kind) in enumerate(jobs):
                progress(i / len(jobs), f"scene {scene.seed}: {qa.question}")
                spec = RunSpec(model=model, prompt=qa.question, image=f"scene-{scene.seed}",
                               max_new_tokens=max_new_tokens)
                capture = run(spec, store)
                if method == "vhr":  # VHR selects heads by the capture's VHD: two more passes
                    from capture.probes_vlm import vhd

                    vhd(capture, store=store)
                try:
                    intervention = vlm_presets.for_capture(method, capture, heads=heads, **params)
                except InterventionError:  # e.g. VAR on an input without image-centric heads: nothing to edit
                    intervention = None
                after = capture.output.text if intervention is None else \
                    _answer_with(handle, dataclasses.replace(spec, intervention=intervention))
                result.rows.append(BatchRow(scene.seed, qa.question, kind, qa.answer, capture.output.text, after,
                                            edited=intervention is not None))
                store.evict(capture.key)
        finally:
            store.close()
    progress(1.0, "done")
    return result


def gaze_pointing(model: str, n_scenes: int = 20, per_scene: int = 3, layers=None, heads=None,
                  progress: Progress = no_progress):
    """analytics.vlm.Pointing of the GIFT saliency over held-out scenes' single-object questions
    (colour, shape, position, present-object presence), `per_scene` of them per scene."""
    from analytics import vlm
    from cache.store import Store
    from capture.run import run
    from training import scenes
    from training.eval_vlm import held_out_scenes

    saliencies, boxes = [], []
    with tempfile.TemporaryDirectory(prefix="headscope-vlm-gaze-") as folder:
        store = Store(folder, size_limit=4 * 2**30)
        try:
            chosen = held_out_scenes(n_scenes)
            for i, scene in enumerate(chosen):
                progress(i / len(chosen), f"scene {scene.seed}")
                qas = [qa for qa in scenes.questions(scene) if qa.kind in POINTING_KINDS and len(qa.objects) == 1]
                rng = np.random.default_rng([scene.seed, 7])
                for k in rng.choice(len(qas), size=min(per_scene, len(qas)), replace=False):
                    qa = qas[int(k)]
                    capture = run(RunSpec(model=model, prompt=qa.question, image=f"scene-{scene.seed}"), store)
                    saliencies.append(vlm.gaze(capture, layers=layers, heads=heads).saliency)
                    boxes.append([scene.objects[j].box for j in qa.objects])
                    store.evict(capture.key)
        finally:
            store.close()
    size = scenes.VLM.size
    return vlm.pointing(saliencies, boxes, (size, size))


__all__ = ["BatchRow", "BatchResult", "batch_questions", "accuracy_change", "gaze_pointing", "N_SCENES",
           "QUESTIONS_PER_SCENE"]
