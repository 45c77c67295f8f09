"""Quality of the shapes-vlm: exact answers on held-out scenes, per question type.

    nice -n 19 .venv/bin/python -m training.eval_vlm                  # 300 held-out scenes, writes headscope.json
    nice -n 19 .venv/bin/python -m training.eval_vlm --n 40 --no-write
    nice -n 19 .venv/bin/python -m training.eval_vlm --trained /tmp/vlm --no-write   # a trained part not shipped

Scenes: `core.scene_splits.held_out_scenes(n)`, the first `n` of `scenes.make_scene(seed, scenes.VLM)`
for seeds 0, 1, 2, ... whose caption is held out (`scene_splits.held_out`: never drawn in training, whose
scenes have seeds from 1,000,000 on).  Questions: every question `scenes.questions(scene, seed=0)` writes (colour, shape, position,
count, count_colour, count_shape, presence; presence questions about absent objects, answer "no", are
reported on their own as "absent": they measure hallucination).

Exact answer: greedy decoding produces the answer and then <|im_end|>.  Measured in one forward per
scene: all its questions as branches over one shared image prefix (training.vlm_branches.pack; each
branch is exactly the single-question prompt), a question is right when every answer token and the
closing <|im_end|> is the argmax given the tokens before it, which is exactly when greedy decoding
writes that answer.  `--generate K` also runs `generate` on the first K scenes' questions and
reports how often the two agree (they should always).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from capture.vlm import model as vlm_model  # noqa: E402
from core import scene_splits, scenes  # noqa: E402
from training.vlm_branches import BranchMaker, branched_logits, exact, pack  # noqa: E402

BAR = 0.80  # the bar: >= 80% exact answers overall on 300 held-out scenes


def load(trained: Path | None = None):
    """(model, processor): the shipped shapes-vlm through the registry, or a trained part assembled in memory."""
    if trained is None:
        from capture import registry

        handle = registry.load("shapes-vlm")
        return handle.model, handle.tokenizer
    from safetensors.torch import load_file

    model, processor = vlm_model.base_model()
    vlm_model.merge_trained(model, load_file(str(Path(trained) / vlm_model.TRAINED_FILE)))
    return model, processor


def image_embeds(model, processor, images: list[np.ndarray]) -> torch.Tensor:
    """[B, 64, hidden]: the projected image features the model puts at its image tokens."""
    pixels = torch.from_numpy(np.stack([processor.pixels(im)[0] for im in images]))
    feats = model.model.get_image_features(pixel_values=pixels.to(model.device)).pooler_output
    return torch.stack(list(feats))


def evaluate(model, processor, scene_list: list[scenes.Scene], batch: int = 4, progress: bool = False) -> list[dict]:
    """One record per question: scene seed, question, answer, kind, exact (bool)."""
    maker = BranchMaker(processor)
    records = []
    t0 = time.time()
    with torch.inference_mode():
        for start in range(0, len(scene_list), batch):
            chunk = scene_list[start:start + batch]
            qas = [scenes.questions(s, seed=0) for s in chunk]
            packed = pack(maker, [[maker.branch(q) for q in qa] for qa in qas]).to(model.device)
            logits, _ = branched_logits(model, packed, image_embeds(model, processor, [s.image for s in chunk]),
                                     maker.image_start)
            ok = exact(logits, packed)
            flat = [(s, q) for s, qa in zip(chunk, qas) for q in qa]
            for (s, q), good in zip(flat, ok):
                records.append({"seed": s.seed, "question": q.question, "answer": q.answer, "kind": scenes.kind_of(q),
                                "exact": bool(good)})
            if progress and (start // batch) % 10 == 9:
                print(f"  {start + len(chunk)}/{len(scene_list)} scenes, {time.time() - t0:.0f} s", flush=True)
    return records


def summary(records: list[dict]) -> dict:
    """Accuracy overall, per kind, and for all presence questions (yes and absent together)."""
    out = {"n_questions": len(records), "overall": float(np.mean([r["exact"] for r in records]))}
    per = {}
    for kind in scenes.KINDS:
        got = [r["exact"] for r in records if r["kind"] == kind]
        if got:
            per[kind] = {"n": len(got), "exact": float(np.mean(got))}
    out["per_kind"] = per
    return out


def table(result: dict, n_scenes: int) -> str:
    lines = [f"| {n_scenes} held-out scenes | questions | exact |", "|---|---|---|"]
    names = {"presence": "presence (present object, \"yes\")", "absent": "presence of an absent object (\"no\")"}
    for kind, v in result["per_kind"].items():
        lines.append(f"| {names.get(kind, kind)} | {v['n']} | {100 * v['exact']:.1f}% |")
    lines.append(f"| **overall** | {result['n_questions']} | **{100 * result['overall']:.1f}%** |")
    return "\n".join(lines)


def generate_check(model, processor, scene_list: list[scenes.Scene], records: list[dict]) -> dict:
    """Greedy `generate` on these scenes' questions: agreement with the one-pass measure."""
    import threading
    from types import SimpleNamespace

    handle = SimpleNamespace(model=model, tokenizer=processor, lock=threading.Lock())
    by_key = {(r["seed"], r["question"]): r for r in records}
    agree, n, right = 0, 0, 0
    for scene in scene_list:
        qas = scenes.questions(scene, seed=0)
        said = vlm_model.answers(handle, [(scene.image, q.question) for q in qas])
        for q, text in zip(qas, said):
            exact = text == q.answer
            right += exact
            agree += exact == by_key[(scene.seed, q.question)]["exact"]
            n += 1
    return {"questions": n, "agree": agree, "generate_exact": right / max(1, n)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="held-out scenes")
    parser.add_argument("--trained", type=Path, default=None, help="a folder with trained.safetensors (default: shipped)")
    parser.add_argument("--generate", type=int, default=0, help="also check K scenes with real greedy generation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not store the result in headscope.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = load(args.trained)
    scene_list = scene_splits.held_out_scenes(args.n)
    records = evaluate(model, processor, scene_list, progress=True)
    result = summary(records)
    result.update({"n_scenes": args.n, "seconds": round(time.time() - t0, 1), "split": "held_out",
                   "scene_seeds": "the first n seeds >= 0 with a held-out caption", "question_seed": 0,
                   "measure": "greedy exact match (answer + <|im_end|>), one branched forward per scene"})
    print(table(result, args.n))
    if args.generate:
        check = generate_check(model, processor, scene_list[: args.generate], records)
        result["generate_check"] = check
        print(f"generate check on {args.generate} scenes: {check['agree']}/{check['questions']} agree, "
              f"generate exact {100 * check['generate_exact']:.1f}%")
    print(f"overall {100 * result['overall']:.1f}% (bar {100 * BAR:.0f}%), {result['seconds']:.0f} s")
    if not args.no_write:
        folder = args.trained or vlm_model.MODEL_DIR
        settings = vlm_model.read_settings(folder)
        settings["quality"] = result
        (Path(folder) / vlm_model.SETTINGS_FILE).write_text(json.dumps(settings, indent=1))


if __name__ == "__main__":
    main()
