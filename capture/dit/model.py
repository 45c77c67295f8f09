"""The embedded text-to-image DiT `shapes-dit`: its architecture, text conditioning and sampler.

Architecture: diffusers' `SD3Transformer2DModel` (MM-DiT, joint attention), in pixel space (no VAE):
32 x 32 RGB images in [-1, 1], 4 x 4 patches (an 8 x 8 grid of 64 image tokens), hidden 128, 4 blocks of
4 heads (head_dim 32, RMS q/k norm).  Each joint-attention map covers [64 image tokens + 17 text tokens]
on both axes, so one map per layer holds image self-attention (what PAG / SoftPAG perturb), image ->
text cross-attention (word heatmaps, DAAM) and the text tokens' received attention (RefAM sinks).

Text conditioning: the embedded `minilm` encoder (all-MiniLM-L6-v2).  A prompt is tokenised and padded
to TEXT_LEN WordPiece tokens ([CLS] ... [SEP] [PAD]...); the DiT reads MiniLM's last hidden states of
all TEXT_LEN positions (the padding positions' states too: MiniLM masks them as keys, the DiT sees
them, as SD3 sees T5's padding) and the masked mean of the real tokens as the pooled embedding.

Training (training/shapes_dit.py): rectified flow (flow matching), x_t = (1 - s) x0 + s e, the model
predicts v = e - x0 at timestep 1000 s; captions dropped 10% of the time for classifier-free guidance.
Sampling: `FlowMatchEulerDiscreteScheduler`, CFG, and optionally a PAG / SoftPAG perturbed branch.

Weights live in assets/models/shapes-dit/ (diffusers `save_pretrained`, fp16), with `headscope.json`
(text length, guidance default, training record).  The text encoder is never run inside a HeadScope
session (its attention goes through `capture.engine.attention` too): prompts are encoded first, in an empty
context, and then the DiT samples inside the session.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "assets" / "models" / "shapes-dit"
TEXT_LEN = 17  # [CLS] + 15 words of a two-object caption + [SEP]
IMAGE_SIZE = 32
TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE, patch_size=4, in_channels=3, out_channels=3, num_layers=4,
    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=384, caption_projection_dim=128,
    pooled_projection_dim=384, pos_embed_max_size=IMAGE_SIZE // 4, qk_norm="rms_norm",
)
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance scale (headscope.json may override)
DEFAULT_STEPS = 20


def build_transformer(seed: int = 0):
    """A freshly initialised shapes-dit transformer (deterministic in `seed`)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


class TextEncoder:
    """MiniLM token states and pooled embeddings of prompts, cached per prompt."""

    def __init__(self, handle, text_len: int = TEXT_LEN):
        self.model = handle.model
        self.tokenizer = handle.tokenizer
        self.text_len = text_len
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def token_ids(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.text_len, truncation=True)["input_ids"]
        return list(ids)

    def tokens(self, prompt: str) -> list[str]:
        """The TEXT_LEN token labels the DiT sees ("[CLS]", "a", "red", ..., "[SEP]", "[PAD]" ...)."""
        return self.tokenizer.convert_ids_to_tokens(self.token_ids(prompt))

    def n_real(self, prompt: str) -> int:
        """Tokens before the padding ([CLS] .. [SEP])."""
        enc = self.tokenizer(prompt, padding="max_length", max_length=self.text_len, truncation=True)
        return int(sum(enc["attention_mask"]))

    def encode(self, prompts: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(states  # [B, TEXT_LEN, 384], pooled  # [B, 384]) float32."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        for start in range(0, len(missing), batch):
            chunk = missing[start:start + batch]
            # an empty context: no HeadScope session (DiT edits, recorders) can reach MiniLM's attention
            states, pooled = contextvars.Context().run(self._run, chunk)
            with self._lock:
                for i, p in enumerate(chunk):
                    self._cache[p] = (states[i], pooled[i])
        states = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return states, pooled

    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.text_len, truncation=True,
                             return_tensors="pt")
        where = next(self.model.parameters()).device  # MiniLM runs where HEADSCOPE_DEVICE puts it
        with torch.inference_mode():
            hidden = self.model(input_ids=enc["input_ids"].to(where),
                                attention_mask=enc["attention_mask"].to(where)).last_hidden_state
        hidden = hidden.float().cpu()  # the DiT itself runs in float32 on the CPU
        mask = enc["attention_mask"].unsqueeze(-1).float()  # [B, L, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return hidden.clone(), pooled.clone()


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """x  # [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_pixels(images: np.ndarray) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, 3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def initial_noise(seeds: list[int], size: int = IMAGE_SIZE) -> torch.Tensor:
    """[B, 3, size, size] standard normal noise, one generator per seed (a sample depends on its seed only)."""
    return torch.cat([torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@dataclass
class Guidance:
    """How the branches of one sampling step combine (v = velocity prediction of each branch):
    v = v_u + cfg (v_c - v_u) + pag (v_c - v_p); cfg = 1 drops the unconditional branch, pag = 0 the
    perturbed one (whose edits are `perturbation`, applied to that branch's rows only)."""

    cfg: float = DEFAULT_GUIDANCE
    pag: float = 0.0
    perturbation: object = None  # core.interventions.Intervention for the perturbed branch


@dataclass
class StepInfo:
    """What the sampler tells `on_step` before each transformer call."""

    index: int  # 0 .. steps-1
    timestep: float  # the scheduler's timestep (1000 * sigma)
    sigma: float


@dataclass
class ShapesDit:
    """The loaded shapes-dit: transformer + MiniLM + scheduler settings."""

    transformer: torch.nn.Module
    text: TextEncoder
    settings: dict = field(default_factory=dict)

    @property
    def guidance(self) -> float:
        return float(self.settings.get("guidance", DEFAULT_GUIDANCE))

    @property
    def image_size(self) -> int:
        return int(self.settings.get("image_size", IMAGE_SIZE))

    @property
    def grid(self) -> tuple[int, int]:
        n = self.image_size // int(self.transformer.config.patch_size)
        return n, n

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(self.settings.get("shift", 1.0)))

    def velocity(self, x: torch.Tensor, t: torch.Tensor, states: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states=x, encoder_hidden_states=states, pooled_projections=pooled,
                                timestep=t, return_dict=False)[0]

    def sample(self, prompts: list[str], seeds: list[int], steps: int = DEFAULT_STEPS,
               guidance: Guidance | None = None, intervention=None, on_step: Callable[[StepInfo], None] | None = None,
               spans: dict[str, range] | None = None) -> np.ndarray:
        """images  # [B, H, W, 3] uint8 for B prompts and seeds.

        Batch rows per step: the B conditional rows first (the recorded ones: row 0 is prompt 0's
        conditional branch), then B unconditional rows (cfg > 1), then B perturbed rows (pag > 0).
        `intervention` (an Intervention) applies to every row; the perturbed rows get
        `guidance.perturbation` on top.  `on_step(StepInfo)` runs before each transformer call.
        """
        from capture.engine.session import session
        from core.interventions import Intervention

        guidance = guidance or Guidance(cfg=self.guidance)
        intervention = intervention or Intervention()
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        b = len(prompts)
        use_cfg = guidance.cfg != 1.0
        use_pag = guidance.pag != 0.0 and guidance.perturbation is not None and not guidance.perturbation.empty
        states, pooled = self.text.encode(list(prompts) + ([""] if use_cfg else []))
        cond_s, cond_p = states[:b], pooled[:b]
        parts_s, parts_p = [cond_s], [cond_p]
        if use_cfg:
            parts_s.append(states[b:].expand(b, -1, -1))
            parts_p.append(pooled[b:].expand(b, -1))
        if use_pag:
            parts_s.append(cond_s)
            parts_p.append(cond_p)
        all_s, all_p = torch.cat(parts_s), torch.cat(parts_p)
        n_branches = len(parts_s)
        rows = None
        if use_pag:
            empty = Intervention()
            rows = [empty] * (b * (n_branches - 1)) + [guidance.perturbation] * b
        scheduler = self.scheduler()
        scheduler.set_timesteps(steps)
        x = initial_noise(seeds, self.image_size)
        if spans is None:
            n_img = self.grid[0] * self.grid[1]
            spans = {"image": range(0, n_img), "text": range(n_img, n_img + self.text.text_len)}
        with session(intervention, spans=spans, row_interventions=rows), torch.inference_mode():
            for i, t in enumerate(scheduler.timesteps):
                if on_step is not None:
                    on_step(StepInfo(i, float(t), float(scheduler.sigmas[i])))
                v = self.velocity(torch.cat([x] * n_branches), t.expand(b * n_branches), all_s, all_p)
                v_c = v[:b]
                out = v_c
                k = 1
                if use_cfg:
                    v_u = v[b * k:b * (k + 1)]
                    k += 1
                    out = v_u + guidance.cfg * (v_c - v_u)
                if use_pag:
                    v_p = v[b * k:b * (k + 1)]
                    out = out + guidance.pag * (v_c - v_p)
                x = scheduler.step(out, t, x, return_dict=False)[0]
        return to_pixels(x)


    # ---- the interface capture.dit.adapter shares with capture.dit.pipeline.PipelineDit ------------------
    default_steps = DEFAULT_STEPS
    cross_heads = 0  # joint attention: the word maps are the layers' own

    @property
    def default_side(self) -> int:
        return self.image_size

    def grid_of(self, height: int, width: int) -> tuple[int, int]:
        return self.grid

    def text_length(self, prompt: str) -> tuple[int, int]:
        return self.text.text_len, self.text.text_len

    def check_size(self, name: str, height: int, width: int) -> None:
        if (height, width) != (self.image_size, self.image_size):
            from core.errors import InputError

            raise InputError(f"{name} samples {self.image_size} x {self.image_size} pictures only.")

    def branches(self, intervention=None, cfg: float | None = None) -> tuple[Guidance, object]:
        """(how the branches combine, the intervention on every branch): a SoftPAG / PAG intervention
        (capture.dit.presets) becomes the perturbed guidance branch, any other edits every branch; `cfg` the
        classifier-free guidance scale (None: the model's)."""
        from capture.dit import presets
        from core.interventions import Intervention

        intervention = intervention or Intervention()
        cfg = self.guidance if cfg is None else cfg
        if presets.is_guidance(intervention):
            return Guidance(cfg=cfg, pag=presets.pag_scale(intervention), perturbation=intervention), Intervention()
        return Guidance(cfg=cfg), intervention

    def sample_many(self, prompts: list[str], seeds: list[int], steps: int, height: int, width: int,
                    intervention=None, guidance: float | None = None) -> np.ndarray:
        """images  # [B, H, W, 3] uint8, one per (prompt, seed), in one batch, at classifier-free guidance scale
        `guidance` (None: the model's)."""
        guidance, direct = self.branches(intervention, guidance)
        return self.sample(prompts, seeds, steps=steps, guidance=guidance, intervention=direct)

    def run(self, prompt: str, seed: int, steps: int, height: int, width: int, intervention=None, recorder=None,
            on_step: Callable[[int], None] | None = None, guidance: float | None = None):
        """(image  # [H, W, 3] uint8, token axis, scheduler timesteps, notes) of one sampling run of one
        prompt, recorded by `recorder` (capture.dit.record.MapRecorder) when given; `guidance` the classifier-free
        guidance scale (None: the model's)."""
        from capture.dit.attend import recording
        from capture.dit.tokens import shapes_layout

        layout = shapes_layout(self.grid, self.text.tokens(prompt), self.text.n_real(prompt))
        notes = []
        if len(self.text.tokenizer(prompt)["input_ids"]) > self.text.text_len:
            notes.append(f"The prompt is longer than the {self.text.text_len} tokens shapes-dit reads; the rest "
                         "was cut.")
        guidance, direct = self.branches(intervention, guidance)
        timesteps: dict[int, float] = {}

        def step(info: StepInfo) -> None:
            timesteps[info.index] = info.timestep
            if recorder is not None:
                recorder.begin_step(info.index)
            if on_step is not None:
                on_step(info.index)

        if recorder is not None:
            recorder.start(layout)
        with recording(recorder) if recorder is not None else contextlib.nullcontext():
            image = self.sample([prompt], [seed], steps=steps, guidance=guidance, intervention=direct, on_step=step,
                                spans=layout.spans())[0]
        return image, layout, [timesteps[i] for i in range(steps)], notes


_loaded: dict[str, ShapesDit] = {}
_load_lock = threading.Lock()


def read_settings(folder: Path = MODEL_DIR) -> dict:
    path = Path(folder) / "headscope.json"
    return json.loads(path.read_text()) if path.exists() else {}


def load(minilm, folder: Path | str = MODEL_DIR) -> ShapesDit:
    """The shapes-dit in `folder` (once per process) with `minilm` (the loaded MiniLM handle) as its text
    encoder, and HeadScope's attention processors installed."""
    from diffusers import SD3Transformer2DModel

    from capture.dit import attention as dit_attention

    folder = Path(folder)
    key = str(folder.resolve())
    with _load_lock:
        if key in _loaded:
            return _loaded[key]
        if not (folder / "config.json").exists():
            from core.errors import ModelUnavailable

            raise ModelUnavailable(f"There is no trained shapes-dit in {folder}; run `python training/shapes_dit.py`.")
        transformer = SD3Transformer2DModel.from_pretrained(str(folder), dtype=torch.float32)
        transformer.eval()
        dit_attention.install(transformer)
        settings = read_settings(folder)
        model = ShapesDit(transformer, TextEncoder(minilm, int(settings.get("text_len", TEXT_LEN))), settings)
        _loaded[key] = model
        return model
