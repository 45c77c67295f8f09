"""Before | after accuracy of a VLM intervention over held-out shapes scenes.

For each of the first `n_scenes` held-out scenes (core.scene_splits.held_out_scenes: captions never
drawn in training) and `questions_per_scene` of its questions (core.scenes.questions; the
absent-object presence question, answer "no", always among them: it measures hallucination), the
question is answered (capture.vlm.answers: all questions first, those of one prompt shape
together), its answer is recorded once (the maps and residual stream the intervention is built
from: probes.vlm.for_capture), and it is answered again greedily with the intervention active
(again in batches, one intervention per batch row).  Each picture's system prompt and picture (~88 of
~105 tokens) run once, recorded (VlmAdapter.record_prefix); the answers and the recorded passes (all
of a picture's in one forward: VlmAdapter.record_from) continue from it (LLaVA; the other families'
masks or positions do not allow it, and each question is recorded whole).  The recorded passes go to a
temporary store (in RAM where /dev/shm exists) and are dropped as soon as they are used.

An answer is right when it equals the ground truth after stripping and lower-casing (as
training.eval_vlm's exact answers).  `gaze_pointing` measures, on the same kind of scenes, how often
the GIFT saliency peak falls in the asked object's box (analytics.pointing).
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field

import numpy as np

from core.progress import Progress, no_progress
from core.types import RunSpec

N_SCENES = 10
QUESTIONS_PER_SCENE = 4
POINTING_KINDS = ("colour", "shape", "position", "presence")  # questions about one object that is there


@dataclass
class BatchRow:
    seed: int
    question: str
    kind: str  # core.scenes.QA.kind, "absent" for presence questions about an absent object
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
    from core import scenes
    from core.scene_splits import held_out_scenes

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


def _fast_folder() -> str | None:
    """A RAM-backed folder for the batch's throw-away captures (/dev/shm), when there is one."""
    import os

    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def accuracy_change(model: str, method: str, params: dict | None = None, n_scenes: int = N_SCENES,
                    per_scene: int = QUESTIONS_PER_SCENE, max_new_tokens: int = 8,
                    progress: Progress = no_progress) -> BatchResult:
    """Exact-answer accuracy before and after `method` ("var", "gift", "vhr", "mask" with params["heads"])."""
    from cache.store import Store
    from capture import registry
    from capture.vlm import presets as vlm_presets
    from capture.vlm.adapter import RecordedPrefix, VlmAdapter
    from capture.vlm.answers import answer_ids, answers_with
    from core.errors import InterventionError
    from probes import vlm as vlm_probes

    params = dict(params or {})
    heads = params.pop("heads", None)
    handle = registry.load(model)
    result = BatchResult(method=method, params={**params, **({"heads": heads} if heads else {})})
    # masking the chosen heads needs nothing measured on the input: no recorded pass
    fixed = vlm_presets.mask_image(handle.meta, heads or ()) if method == "mask" else None
    jobs = batch_questions(n_scenes, per_scene)
    specs = [RunSpec(model=model, prompt=qa.question, image=f"scene-{scene.seed}", max_new_tokens=max_new_tokens)
             for scene, qa, _ in jobs]
    adapter = VlmAdapter(handle)
    encoded = [adapter.encode(spec) for spec in specs]
    by_picture: dict[tuple[str, int], list[int]] = {}  # (picture, prefix length) -> its questions
    for i, (spec, (_inputs, spans)) in enumerate(zip(specs, encoded)):
        by_picture.setdefault((spec.image, spans["image"].stop), []).append(i)
    # each picture's system prompt and picture run once, recorded: the plain answers, the recorded
    # passes and the edited answers (when the edits leave those rows alone) all continue from them
    recorded: dict[tuple[str, int], RecordedPrefix | None] = {}  # None: each question recorded whole
    for picture, rows in by_picture.items() if fixed is None else ():
        with handle.lock:
            recorded[picture] = adapter.record_prefix(encoded[rows[0]][0], picture[1]) \
                if adapter.family.shares_prefix else None
    caches = {picture: prefix.cache for picture, prefix in recorded.items() if prefix is not None}
    # all the plain answers first, a batch of one prompt shape at a time
    before = answer_ids(handle, specs, progress=lambda f, m: progress(0.2 * f, m), prefixes=caches, encoded=encoded)
    edited: dict[int, RunSpec] = {}  # row -> the spec with its intervention, answered in batches below
    for i, (scene, qa, kind) in enumerate(jobs):
        text = adapter.tokenizer.decode(before[i], skip_special_tokens=True).strip()
        result.rows.append(BatchRow(scene.seed, qa.question, kind, qa.answer, text, text, edited=False))
        if fixed is not None:
            edited[i] = dataclasses.replace(specs[i], intervention=fixed)
    with tempfile.TemporaryDirectory(prefix="headscope-vlm-batch-", dir=_fast_folder()) as folder:
        store = Store(folder, size_limit=4 * 2**30)
        try:
            for done, (picture, prefix) in enumerate(recorded.items()):
                rows = by_picture[picture]
                progress(0.2 + 0.6 * done / len(recorded), f"{picture[0]}: recording {len(rows)} answers")
                with handle.lock:  # the recorded passes of this picture's answers, in one forward from its prefix
                    captures = adapter.record_from(prefix, store, [
                        (specs[i], f"q{i}", *encoded[i], before[i]) for i in rows]) if prefix is not None else \
                        [adapter.record(specs[i], f"q{i}", store, *encoded[i], before[i], vision=False) for i in rows]
                for i, capture in zip(rows, captures):
                    if method == "vhr":  # VHR selects heads by the capture's VHD: two more passes
                        from probes.vlm import vhd

                        vhd(capture, store=store)
                    try:
                        edited[i] = dataclasses.replace(
                            specs[i], intervention=vlm_probes.for_capture(method, capture, heads=heads, **params))
                    except InterventionError:  # e.g. VAR on an input without image-centric heads: nothing to edit
                        pass
                    store.evict(capture.key)
        finally:
            store.close()
    for i in edited:
        result.rows[i].edited = True
    answers = answers_with(handle, list(edited.values()), prefixes=caches, encoded=[encoded[i] for i in edited],
                           progress=lambda f, m: progress(0.8 + 0.2 * f, f"{m} with {method}"))
    for i, after in zip(edited, answers):
        result.rows[i].after = after
    progress(1.0, "done")
    return result


def gaze_pointing(model: str, n_scenes: int = 20, per_scene: int = 3, layers=None, heads=None,
                  progress: Progress = no_progress):
    """analytics.pointing.Pointing of the GIFT saliency over held-out scenes' single-object questions
    (colour, shape, position, present-object presence), `per_scene` of them per scene."""
    from analytics import vlm
    from analytics.pointing import pointing
    from cache.store import Store
    from capture.api import run
    from core import scenes
    from core.scene_splits import held_out_scenes

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
    return pointing(saliencies, boxes, (size, size))


__all__ = ["BatchRow", "BatchResult", "batch_questions", "accuracy_change", "gaze_pointing", "N_SCENES",
           "QUESTIONS_PER_SCENE"]
