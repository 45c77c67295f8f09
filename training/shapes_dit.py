"""Train the embedded `shapes-dit` (capture/dit/model.py) on procedurally drawn scenes, on the CPU.

    nice -n 19 .venv/bin/python training/shapes_dit.py            # the shipped model (seed 0, both stages)
    nice -n 19 .venv/bin/python training/shapes_dit.py --steps 200 --out /tmp/dit   # a quick one-stage try

Two stages: (1) 3000 steps from scratch at lr 1e-3 on the scene generator's mix (half one-object, half
two-object scenes); (2) 1500 steps from stage 1's EMA weights at lr 3e-4 with 70% two-object scenes,
which is where attribute binding ("the red one at the left, the green one at the top") is learnt.
Stage 1's weights are kept in ./cache_data/training/; `--stage1 FOLDER` reuses a stage-1 folder.

Data: `core.scenes` with the DIT config (32 x 32, one or two shapes, distinct colours and cells),
a fresh scene every sample, captions from the training part of the caption space only
(`scene_splits.held_out` keeps ~10% of captions for evaluation).  Text: MiniLM states of every caption of
the space, computed once (about two CPU minutes) and kept in ./cache_data/ for reruns.

Objective: rectified flow.  x0 the image in [-1, 1], e ~ N(0, I), sigma from a logit-normal(0, 1)
(SD3's choice), x = (1 - sigma) x0 + sigma e, target v = e - x0, loss = MSE(v_pred, v), timestep
1000 sigma (what FlowMatchEulerDiscreteScheduler feeds the model).  Caption dropped (the empty
prompt) 10% of the time for classifier-free guidance.  AdamW, warm-up then cosine decay, gradient
clipping, an EMA of the weights (the EMA is what is saved).

Deterministic from --seed: one process, fixed thread count, seeded data and noise.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the CPU is shared: never spin waiting for work
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from capture.dit import model as dit_model  # noqa: E402
from core import scene_splits, scenes  # noqa: E402


def caption_space(config: scenes.SceneConfig = scenes.DIT) -> list[str]:
    """Every caption of one or two objects (distinct cells and colours), in a fixed order."""
    singles = [scenes.ObjectSpec(s, c, p) for c in scenes.COLOURS for s in scenes.SHAPES for p in scenes.POSITIONS]
    out = [scenes.caption_of([a]) for a in singles]
    if config.max_objects >= 2:
        out += [scenes.caption_of([a, b]) for a in singles for b in singles
                if a.colour != b.colour and a.position != b.position]
    return out


def text_table(encoder: dit_model.TextEncoder, captions: list[str], cache: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(states  # [caption, TEXT_LEN, 384] float16, pooled  # [caption, 384] float32), cached on disk."""
    if cache is not None and cache.with_suffix(".states.npy").exists():
        states = np.load(cache.with_suffix(".states.npy"))
        pooled = np.load(cache.with_suffix(".pooled.npy"))
        if len(states) == len(captions):
            return states, pooled
    states = np.empty((len(captions), encoder.text_len, 384), dtype=np.float16)
    pooled = np.empty((len(captions), 384), dtype=np.float32)
    for start in range(0, len(captions), 512):
        chunk = captions[start:start + 512]
        s, p = contextless(encoder, chunk)
        states[start:start + len(chunk)] = s.numpy().astype(np.float16)
        pooled[start:start + len(chunk)] = p.numpy()
        print(f"  text states {start + len(chunk)}/{len(captions)}", flush=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".states.npy"), states)
        np.save(cache.with_suffix(".pooled.npy"), pooled)
    return states, pooled


def contextless(encoder: dit_model.TextEncoder, prompts: list[str]):
    """Encode without filling the encoder's per-prompt cache (the table is the cache here)."""
    import contextvars

    return contextvars.Context().run(encoder._run, prompts)


class Batches:
    """Training batches: (images  # [B, 3, 32, 32], caption indices  # [B]), deterministic in the seed."""

    def __init__(self, index: dict[str, int], batch: int, seed: int, config: scenes.SceneConfig = scenes.DIT,
                 two_share: float | None = None):
        self.index, self.batch, self.seed, self.config = index, batch, seed, config
        self.two_share = two_share  # share of two-object scenes; None: the scene generator's (one half)

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step, 7])
        images, ids = [], []
        while len(ids) < self.batch:
            n = None if self.two_share is None else (2 if rng.random() < self.two_share else 1)
            specs = scenes.random_specs(rng, self.config, n)
            caption = scenes.caption_of(specs)
            if scene_splits.held_out(caption):
                continue
            scene = scenes.render(specs, int(rng.integers(2**31)), self.config)
            images.append(scene.image)
            ids.append(self.index[caption])
        return np.stack(images), np.array(ids)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: Path, steps: int, batch: int, lr: float, seed: int, threads: int, drop: float = 0.1,
          ema_decay: float = 0.999, log_every: int = 50, init: Path | None = None,
          two_share: float | None = None, warmup: int | None = None) -> dict:
    """One training stage: from scratch (`init` None) or from the weights in `init`; saves to `out`."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    from capture import registry

    minilm = registry.load("minilm")
    encoder = dit_model.TextEncoder(minilm)
    captions = caption_space()
    index = {c: i for i, c in enumerate(captions)}
    t0 = time.time()
    cpu0 = time.process_time()
    cache = ROOT / "cache_data" / "training" / f"shapes-dit-text-{len(captions)}-{encoder.text_len}"
    states_np, pooled_np = text_table(encoder, captions, cache)
    states_all = torch.from_numpy(states_np)  # float16, cast per batch
    pooled_all = torch.from_numpy(pooled_np)
    empty_s, empty_p = contextless(encoder, [""])
    print(f"text table: {len(captions)} captions, {time.time() - t0:.0f} s", flush=True)

    model = dit_model.build_transformer(seed)
    if init is not None:
        from diffusers import SD3Transformer2DModel

        model.load_state_dict(SD3Transformer2DModel.from_pretrained(str(init), torch_dtype=torch.float32).state_dict())
    model.train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.99))
    batches = Batches(index, batch, seed if init is None else seed + 1000, two_share=two_share)
    gen = torch.Generator().manual_seed(seed + 1 if init is None else seed + 1001)
    pool = ThreadPoolExecutor(max_workers=1)
    pending = pool.submit(batches, 0)
    losses, history = [], []
    warmup = min(200, steps // 10 + 1) if warmup is None else warmup
    t_train = time.time()
    for step in range(steps):
        images, ids = pending.result()
        if step + 1 < steps:
            pending = pool.submit(batches, step + 1)
        x0 = dit_model.from_pixels(images)
        s = states_all[ids].float()
        p = pooled_all[ids]
        dropped = torch.rand(batch, generator=gen) < drop
        if dropped.any():
            s[dropped] = empty_s[0]
            p[dropped] = empty_p[0]
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal(0, 1)
        noise = torch.randn(x0.shape, generator=gen)
        sig = sigma.view(-1, 1, 1, 1)
        xt = (1 - sig) * x0 + sig * noise
        target = noise - x0
        for group in optim.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        pred = model(hidden_states=xt, encoder_hidden_states=s, pooled_projections=p, timestep=sigma * 1000,
                     return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = float(np.mean(losses[-log_every:]))
            history.append((step + 1, mean))
            rate = (step + 1) / (time.time() - t_train)
            print(f"step {step + 1}/{steps} loss {mean:.4f} lr {lr_at(step, steps, lr, warmup):.2e} "
                  f"{rate:.2f} it/s, eta {(steps - step - 1) / rate / 60:.1f} min", flush=True)
    pool.shutdown()
    wall = time.time() - t0
    cpu = time.process_time() - cpu0
    model.load_state_dict(ema)
    model.eval()
    record = {
        "architecture": "SD3Transformer2DModel (MM-DiT joint attention), pixel space",
        "text_encoder": "minilm (all-MiniLM-L6-v2), last hidden states + masked mean pooling",
        "text_len": encoder.text_len, "image_size": dit_model.IMAGE_SIZE, "shift": 1.0,
        "guidance": dit_model.DEFAULT_GUIDANCE,
        "training": {"seed": seed, "init": Path(init).name if init else None, "two_object_share": two_share or 0.5,
                     "steps": steps, "batch": batch, "lr": lr, "caption_dropout": drop,
                     "ema_decay": ema_decay, "objective": "rectified flow, v = noise - x0, logit-normal sigma",
                     "captions": len(captions), "held_out": sum(scene_splits.held_out(c) for c in captions),
                     "threads": threads, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                     "final_loss": round(float(np.mean(losses[-200:])), 5),
                     "loss_history": [(s, round(v, 5)) for s, v in history]},
    }
    save(model, out, record)
    return record


def save(model: torch.nn.Module, out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(str(out), safe_serialization=True)
    model.to(torch.float32)
    # a new model: what eval_dit.py measured on an earlier one no longer holds
    (out / "headscope.json").write_text(json.dumps(record, indent=1))
    print(f"saved to {out}", flush=True)


STAGE1 = dict(steps=3000, lr=1e-3, two_share=None, warmup=None)  # the scene generator's mix: half two-object
STAGE2 = dict(steps=1500, lr=3e-4, two_share=0.7, warmup=50)  # fine-tune: more two-object scenes (binding)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=dit_model.MODEL_DIR)
    parser.add_argument("--steps", type=int, default=None, help="one stage of this many steps (a quick try)")
    parser.add_argument("--stage1", type=Path, default=None,
                        help="the folder stage 1 wrote (skips re-running it: stage 1 is deterministic)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.steps is not None:
        record = train(args.out, args.steps, args.batch, STAGE1["lr"], args.seed, args.threads)
        stages = [record["training"]]
    else:
        first = args.stage1
        stages = []
        if first is None:
            first = ROOT / "cache_data" / "training" / f"{args.out.name}.stage1-seed{args.seed}"
            stages.append(train(first, STAGE1["steps"], args.batch, STAGE1["lr"], args.seed,
                                args.threads)["training"])
        else:
            stages.append(dit_model.read_settings(first).get("training", {}))
        record = train(args.out, STAGE2["steps"], args.batch, STAGE2["lr"], args.seed, args.threads, init=first,
                       two_share=STAGE2["two_share"], warmup=STAGE2["warmup"])
        stages.append(record["training"])
        record["training"] = {"stages": stages, "final_loss": record["training"]["final_loss"],
                              "cpu_s": round(sum(s.get("cpu_s", 0) for s in stages), 1),
                              "wall_s": round(sum(s.get("wall_s", 0) for s in stages), 1)}
        (args.out / "headscope.json").write_text(json.dumps(record, indent=1))
    t = record["training"]
    print(f"done: final loss {t['final_loss']}, {t['wall_s'] / 60:.1f} min wall, {t['cpu_s'] / 60:.1f} min CPU "
          f"({len(stages)} stage(s))")


if __name__ == "__main__":
    main()
