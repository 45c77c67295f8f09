"""Train the embedded `shapes-vlm` (capture/vlm/model.py): the LLaVA projector (+ LoRA on SmolLM2's attention).

    nice -n 19 .venv/bin/python -m training.shapes_vlm                 # the shipped recipe (seed 0), ~1 h on 2 cores
    .venv/bin/python -m training.shapes_vlm --device cuda --eval-every 150   # the same on a GPU (~4 min)
    nice -n 19 .venv/bin/python -m training.shapes_vlm --steps 60 --lora-rank 0 --out /tmp/vlm   # a quick try

The shipped run (this CPU, 2 threads): 600 steps of 8 scenes drawn from 4,800 training scenes, projector
lr 2e-3 and LoRA lr 1e-3 on a cosine schedule 1,500 steps long (stopped at 600, while the learning rate is
still ~70% of its peak: the binding of question words to image tokens comes between steps 450 and 600),
LoRA rank 8 / alpha 16, bfloat16 autocast: 93.8% exact on 300 held-out scenes, in 117.7 CPU-minutes
(78 min of wall time on a machine shared with other work; ~1 h on two quiet cores).  The recipe before
it (LoRA rank 16, both lr 3e-3, the schedule ending at step 600) reached 83.0% on a GPU but only 69.2%
on this CPU: it stopped at the edge of that binding (README, shapes-vlm).

What is trained: LLaVA's two-layer projector (384 -> 576 -> 576, 0.55 M parameters) and, unless
`--lora-rank 0`, rank-r LoRA updates of SmolLM2's attention projections (q, k, v, o of all 30 layers).
DINOv2-small and SmolLM2 stay frozen.  Saved: `trained.safetensors` (fp16, the LoRA scale folded into
B) and `headscope.json` (settings, training record) in assets/models/shapes-vlm/.

Data (training/vlm_data.py): `core.scenes` with the VLM config (112 x 112, 2-4 shapes of distinct
colours and cells), captions from the training part of the caption space only
(`core.scene_splits.training_scene_seeds`; `scene_splits.held_out` keeps ~10% out), and their VQA pairs
(`scenes.questions`: colour, shape, position, counts, presence incl. absent objects): per scene and step
up to 12 questions spread over the question types, plus the caption as the answer to "describe the
picture." (LLaVA's stage-1 task; dense supervision of every object).

The projector is trained on standardised DINOv2 features (per-dimension mean and std of the training
features); the standardisation is folded into its first linear layer when saving, so the saved
projector is LLaVA's, reading raw features (training/vlm_lora.py, with the LoRA wrappers).

Cheap on a CPU by construction:
- DINOv2 is frozen, so its features (hidden states after layer 11, CLS dropped: [64, 384] per scene)
  are computed once for the training scenes and kept in ./cache_data/training/ (vlm_data.feature_table).
- One sequence per scene holds many questions (training/vlm_branches.py): the shared prefix (system prompt, "<|im_start|>user\\n",
  64 image tokens) once, then one branch per question ("\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"
  + answer + "<|im_end|>").  A 4-D attention mask lets each branch see the prefix and itself only, and
  its position ids continue from the prefix, so every branch is exactly the single-question prompt the
  model answers at inference (tests check the logits against the plain forward).
- The loss is the cross-entropy of the answer tokens and the closing <|im_end|> only; the LM head is
  applied at those positions only.

Deterministic from --seed: one process, fixed thread count, seeded scenes, question sampling and init.
This module holds the training loop (`train`), saving and the command line; the held-out measure while
training (`--eval-every`) is training/eval_vlm.py's.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the CPU is shared: never spin waiting for work
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from capture.vlm import model as vlm_model  # noqa: E402
from core import scene_splits, scenes  # noqa: E402
from training import eval_vlm  # noqa: E402
from training.vlm_branches import BranchMaker, branched_logits, exact, pack  # noqa: E402
from training.vlm_data import (CAPTION_QUESTION, DENSE_BACKGROUND, caption_qa, dense_targets,  # noqa: E402
                               feature_table, patch_colours, pick_questions)
from training.vlm_lora import LORA_TARGETS, MLP_TARGETS, add_lora, standardising, trained_state  # noqa: E402


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: Path, steps: int, batch: int, questions_per_scene: int, n_scenes: int, lr: float, lora_rank: int,
          lora_alpha: float, lora_lr: float, seed: int, threads: int, log_every: int = 10,
          normalise: bool = True, captions: bool = True, bf16: bool = False, lora_mlp: bool = False,
          dense_weight: float = 0.0, device: str = "cpu", max_minutes: float | None = None,
          eval_every: int = 0, eval_scenes: int = 100, schedule_steps: int | None = None) -> dict:
    """Train and save to `out`.  `device` "cuda" trains on a GPU (same recipe; results match the CPU run
    statistically, not bit for bit); `max_minutes` stops early (and saves) when the time is up;
    `schedule_steps` (default `steps`) is the length of the cosine schedule: longer than `steps`, the
    run stops while the learning rate is still high (a flatter schedule for a short run);
    `eval_every` > 0 measures exact answers on `eval_scenes` held-out scenes every that many steps."""
    torch.set_num_threads(threads)
    t0, cpu0 = time.time(), time.process_time()
    model, processor = vlm_model.base_model(seed)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    seeds = scene_splits.training_scene_seeds(n_scenes)
    feats = torch.from_numpy(feature_table(model, processor, seeds)).to(device)  # [scene, 64, 384] float16
    t_feats = time.time() - t0
    print(f"features: {len(seeds)} scenes, {t_feats:.0f} s", flush=True)
    norm = None
    if normalise:  # standardised projector inputs while training (folded into linear_1 when saving)
        flat = feats.float().reshape(-1, feats.shape[-1])
        norm = (flat.mean(0), flat.std(0) + 1e-3)
        del flat
    torch.manual_seed(seed)
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    targets = LORA_TARGETS + (MLP_TARGETS if lora_mlp else ())
    loras = add_lora(model, lora_rank, lora_alpha, targets) if lora_rank > 0 else {}
    groups = [{"params": list(projector.parameters()), "lr": lr}]
    if loras:
        groups.append({"params": [p for w in loras.values() for p in (w.lora_A, w.lora_B)], "lr": lora_lr})
    for g in groups:
        g["peak"] = g["lr"]
    optim = torch.optim.AdamW(groups, betas=(0.9, 0.98), weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]
    maker = BranchMaker(processor)
    token_of = {w: processor.token_ids(w)[0] for w in (*scenes.COLOURS, DENSE_BACKGROUND)}
    labels: dict[int, list[str | None]] = {}
    scene_cache: dict[int, scenes.Scene] = {}
    rng = np.random.default_rng([seed, 11])
    order = np.concatenate([rng.permutation(len(seeds)) for _ in range(math.ceil(steps * batch / len(seeds)) + 1)])
    warmup = max(1, min(50, steps // 10))
    history, running = [], {k: [] for k in scenes.KINDS + ("caption",)}
    losses, dense_hits, held_out = [], [], []
    if eval_every:
        eval_list = scene_splits.held_out_scenes(eval_scenes)
    model.train()
    t_train = time.time()
    done = 0
    for step in range(steps):
        if max_minutes is not None and time.time() - t_train > 60 * max_minutes:
            print(f"time is up after {step} steps", flush=True)
            break
        idx = order[step * batch:(step + 1) * batch]
        per_scene, dense = [], []
        for i in idx:
            s = seeds[int(i)]
            if s not in scene_cache:
                scene_cache[s] = scenes.make_scene(s, scenes.VLM)
            qas = scenes.questions(scene_cache[s], seed=int(rng.integers(1 << 30)))
            picked = pick_questions(qas, questions_per_scene, rng)
            if captions:
                picked.append(caption_qa(scene_cache[s]))
            per_scene.append([maker.branch(q) for q in picked])
            if dense_weight > 0:
                if s not in labels:
                    labels[s] = patch_colours(scene_cache[s])
                dense.append(dense_targets(labels[s], token_of, rng))
        packed = pack(maker, per_scene, dense).to(device)
        x = feats[torch.from_numpy(idx).to(device)].float()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):  # AVX512-BF16 matmuls: ~2x fp32 here
            with standardising(projector, norm):
                image_embeds = projector(x)
            logits, dense_logits = branched_logits(model, packed, image_embeds, maker.image_start)
        loss = nn.functional.cross_entropy(logits.float(), packed.targets)
        if dense_logits is not None:
            dense_loss = nn.functional.cross_entropy(dense_logits.float(), packed.dense_targets)
            loss = loss + dense_weight * dense_loss
            dense_hits.append(float((dense_logits.argmax(-1) == packed.dense_targets).float().mean()))
        for g in optim.param_groups:
            g["lr"] = lr_at(step, schedule_steps or steps, g["peak"], warmup)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(float(loss.detach()))
        ok = exact(logits.detach(), packed)
        for kind, good in zip(packed.kinds, ok):
            running[kind].append(bool(good))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            acc = {k: (float(np.mean(v)) if v else float("nan")) for k, v in running.items()}
            total = float(np.mean([g for k, v in running.items() if k != "caption" for g in v]))
            rate = (step + 1) / (time.time() - t_train)
            history.append({"step": step + 1, "loss": round(float(np.mean(losses[-log_every:])), 4),
                            "train_exact": round(total, 3), **{k: round(v, 3) for k, v in acc.items()}})
            if dense_hits:
                history[-1]["dense_exact"] = round(float(np.mean(dense_hits[-log_every:])), 3)
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} exact {total:.2f} "
                  + (f"dense {np.mean(dense_hits[-log_every:]):.2f} " if dense_hits else "")
                  + " ".join(f"{k[:6]} {v:.2f}" for k, v in acc.items())
                  + f" | {rate * 60:.1f} steps/min, eta {(steps - step - 1) / rate / 60:.1f} min", flush=True)
            running = {k: [] for k in scenes.KINDS + ("caption",)}
        done = step + 1
        if eval_every and (done % eval_every == 0 or done == steps):
            held_out.append({"step": done, **held_out_exact(model, processor, eval_list, projector, norm)})
            print(f"held-out ({eval_scenes} scenes) at step {done}: " + json.dumps(held_out[-1]), flush=True)
            model.train()
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    state = trained_state(model, loras, norm)
    record = {
        "architecture": "LlavaForConditionalGeneration: dinov2-s vision tower (112 px, 8 x 8 patches, layer -2, "
                        "CLS dropped) + 2-layer GELU projector + smollm2 (SmolLM2-135M-Instruct)",
        "image_size": vlm_model.IMAGE_SIZE, "image_tokens": vlm_model.N_IMAGE_TOKENS,
        "trained": {"projector_params": sum(p.numel() for p in projector.parameters()),
                    "lora_params": sum(w.lora_A.numel() + w.lora_B.numel() for w in loras.values()),
                    "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_targets": list(targets) if loras else []},
        "training": {"seed": seed, "steps": steps, "batch_scenes": batch, "questions_per_scene": questions_per_scene,
                     "scenes": len(seeds), "steps_done": done, "device": device, "lr_projector": lr, "lr_lora": lora_lr if loras else None,
                     "optimizer": "AdamW (0.9, 0.98), no weight decay, warm-up + cosine, clip 1.0",
                     "schedule_steps": schedule_steps or steps,
                     "loss": "cross-entropy on answer tokens + <|im_end|>", "threads": threads,
                     "standardised_features": normalise, "autocast_bf16": bf16,
                     "dense_colour_weight": dense_weight, "caption_task": CAPTION_QUESTION if captions else None,
                     "feature_seconds": round(t_feats, 1), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                     "final_loss": round(float(np.mean(losses[-50:])), 4), "history": history,
                     "held_out": held_out},
    }
    save(state, out, record)
    return record


def held_out_exact(model, processor, scene_list: list[scenes.Scene], projector: nn.Module,
                   norm: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """Exact answers (overall and per kind, training.eval_vlm) on held-out scenes with the model as it is now."""
    model.eval()
    with standardising(projector, norm):
        result = eval_vlm.summary(eval_vlm.evaluate(model, processor, scene_list, batch=16))
    return {"overall": round(result["overall"], 3),
            **{k: round(v["exact"], 3) for k, v in result["per_kind"].items()}}


def save(state: dict[str, torch.Tensor], out: Path, record: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / vlm_model.TRAINED_FILE), metadata={"format": "pt", "lora_scale": "folded into lora_B"})
    os.chmod(out / vlm_model.TRAINED_FILE, 0o644)  # safetensors writes 0600; the file is shipped in the repo
    # a new model: what eval_vlm.py measured on an earlier one no longer holds
    (out / vlm_model.SETTINGS_FILE).write_text(json.dumps(record, indent=1))
    print(f"saved to {out} ({(out / vlm_model.TRAINED_FILE).stat().st_size / 1e6:.1f} MB)", flush=True)


DEFAULTS = dict(steps=600, schedule_steps=1500, batch=8, questions=12, scenes=4800, lr=2e-3, lora_rank=8,
                lora_alpha=16.0, lora_lr=1e-3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=vlm_model.MODEL_DIR)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="scenes per step")
    parser.add_argument("--questions", type=int, default=DEFAULTS["questions"], help="questions per scene")
    parser.add_argument("--scenes", type=int, default=DEFAULTS["scenes"], help="training scenes (features cached)")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--lora-rank", type=int, default=DEFAULTS["lora_rank"], help="0: projector only")
    parser.add_argument("--lora-alpha", type=float, default=DEFAULTS["lora_alpha"])
    parser.add_argument("--lora-lr", type=float, default=DEFAULTS["lora_lr"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--no-normalise", action="store_true", help="raw DINOv2 features into the projector")
    parser.add_argument("--no-captions", action="store_true", help="questions only, no caption task")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast (default; AVX512-BF16 CPUs: ~1.6x faster steps than fp32)")
    parser.add_argument("--lora-mlp", action="store_true", help="LoRA on the MLP projections too")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda to train on a GPU")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    parser.add_argument("--eval-every", type=int, default=0, help="held-out exact answers every N steps")
    parser.add_argument("--eval-scenes", type=int, default=100)
    parser.add_argument("--schedule-steps", type=int, default=DEFAULTS["schedule_steps"],
                        help="length of the cosine learning-rate schedule (0: --steps)")
    parser.add_argument("--dense", type=float, default=0.0,
                        help="weight of the dense loss: each image token predicts the colour under it")
    args = parser.parse_args(argv)
    record = train(args.out, args.steps, args.batch, args.questions, args.scenes, args.lr, args.lora_rank,
                   args.lora_alpha, args.lora_lr, args.seed, args.threads, args.log_every,
                   normalise=not args.no_normalise, captions=not args.no_captions, bf16=args.bf16,
                   lora_mlp=args.lora_mlp, dense_weight=args.dense, device=args.device,
                   max_minutes=args.max_minutes, eval_every=args.eval_every, eval_scenes=args.eval_scenes,
                   schedule_steps=args.schedule_steps)
    t = record["training"]
    print(f"done: final loss {t['final_loss']}, {t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} min CPU")


if __name__ == "__main__":
    main()
