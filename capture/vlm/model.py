"""The embedded vision-language model `shapes-vlm`, and what every LLaVA-family VLM needs around it.

Architecture: transformers' `LlavaForConditionalGeneration` with the embedded `dinov2-s` (DINOv2-small,
ViT-S/14) as its vision tower and the embedded `smollm2` (SmolLM2-135M-Instruct, 30 x 9 heads) as its
language model.  Pictures are 112 x 112 pixels: 8 x 8 = 64 patches, LLaVA's "default" feature
selection drops the CLS token, so a picture becomes 64 `<image>` tokens in the prompt.  The vision
features are DINOv2's hidden states after its 11th layer (LLaVA's default `vision_feature_layer` -2),
mapped by LLaVA's two-layer GELU projector (384 -> 576 -> 576) into SmolLM2's embedding space.

What HeadScope trained (training/shapes_vlm.py) is small and lives in assets/models/shapes-vlm/:
`trained.safetensors` (fp16) holds the projector and low-rank (LoRA) updates of SmolLM2's attention
projections (`...lora_A` [rank, in], `...lora_B` [out, rank], the LoRA scale folded into B), and
`headscope.json` the training record and measured quality.  On first use `assembled_folder()` merges
them with the packaged weights (the cached smollm2 and dinov2-s conversions: W <- W + B A) into a plain
LLaVA checkpoint, saved once as a safetensors folder in the cache directory (under a lock, like the
smollm2 conversion); later loads read that folder (`registry.load("shapes-vlm")`), so the model that
runs is an ordinary `LlavaForConditionalGeneration` with no adapters left in it.

Prompts use SmolLM2-Instruct's chat template (with its default system prompt) and one user turn
"<image>\\n{question}"; the `<image>` placeholder is expanded to the 64 image tokens.  The tokenizer got
`<image>` as a new special token (id 49152); its embedding row is zero (it is never read: LLaVA puts
the projected patches there), so its logit is 0 and greedy decoding never picks it.

The same `VlmProcessor` serves any LLaVA checkpoint loaded from the hub or a folder (`registry.load(id)`,
modality "vlm"): image preprocessing from its preprocessor_config.json, or from the "image_processor"
record of processor_config.json where transformers 5 saves it (capture.images.ImagePrep, no torchvision),
its tokenizer and chat template (the processor's, else the tokenizer's; a folder with neither is
refused), its image token.  The other families use their own transformers processors (capture.vlm.chat).

For a capture adapter: `processor.encode(image, question)` gives capture.vlm.inputs.VlmInputs with
`input_ids`, `attention_mask`, `pixel_values`, `image_positions` (a range of token indices, row-major over
`processor.grid`, so image token `image_positions[0] + r * cols + c` is patch (r, c)), each patch's box on
the picture (`places`), `tokens` (labels) and `shown` (the pixels the model sees, which the boxes are in);
`answer(handle, image, question)` generates greedily, for any VLM handle.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from capture.vlm.chat import chat_template
from capture.vlm.inputs import VlmInputs, placed
from core.errors import ModelUnavailable

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "assets" / "models" / "shapes-vlm"
TRAINED_FILE = "trained.safetensors"
SETTINGS_FILE = "headscope.json"
IMAGE_SIZE = 112
PATCH = 14
GRID = (IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH)  # 8 x 8 patches
N_IMAGE_TOKENS = GRID[0] * GRID[1]  # "default" feature selection: the CLS token is dropped
IMAGE_TOKEN = "<image>"
VISION_FEATURE_LAYER = -2
ASSEMBLER_VERSION = 1
MAX_NEW_TOKENS = 8  # answers are one to three words


# ---- preprocessing and prompts (any LLaVA-family model) ------------------------------------------------

def shapes_prep():
    """shapes-vlm's image preprocessing: bicubic resize to 112 x 112, DINOv2's (ImageNet) normalisation."""
    from capture.images import IMAGENET_MEAN, IMAGENET_STD, ImagePrep

    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return ImagePrep(do_resize=True, size=square, resample=3, do_center_crop=False, crop_size=square,
                     do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_MEAN,
                     image_std=IMAGENET_STD)


class VlmProcessor:
    """Tokenizer + image preprocessing + chat template of a LLaVA-family model (the ModelHandle's
    `tokenizer` slot for modality "vlm")."""

    def __init__(self, tokenizer, prep, image_token_id: int, grid: tuple[int, int], n_image_tokens: int,
                 chat_template: str | None = None, vision_feature_select_strategy: str = "default"):
        self.tokenizer = tokenizer
        self.prep = prep
        self.image_token_id = int(image_token_id)
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.grid = tuple(grid)
        self.n_image_tokens = int(n_image_tokens)
        self.chat_template = chat_template  # None: the tokenizer's own
        self.strategy = vision_feature_select_strategy

    @property
    def family(self):
        """capture.vlm.families' LLaVA: one grid over the picture as the model saw it, causal."""
        from capture.vlm.families import family_of

        return family_of("llava")

    @classmethod
    def from_pretrained(cls, source: str, config, **kwargs) -> "VlmProcessor":
        """From a LLaVA checkpoint folder or hub id (tokenizer, preprocessor_config.json, chat template)."""
        from transformers import AutoTokenizer

        from capture.images import ImagePrep

        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
        vision = config.vision_config
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        prep = ImagePrep.from_pretrained(source, image_size=size, **kwargs)
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        fixed = prep.fixed_size() or (size, size)
        grid = (fixed[0] // patch, fixed[1] // patch)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        n_tokens = grid[0] * grid[1] + (1 if strategy == "full" else 0)  # the CLS token, kept by "full"
        template = chat_template(source, tokenizer, kwargs)
        if not template:
            raise ModelUnavailable(f"{source} has no chat template, so HeadScope cannot tell how the model expects a "
                                   "question about a picture; add the chat template its model card uses.")
        return cls(tokenizer, prep, config.image_token_id, grid, n_tokens, template, strategy)

    # -- text --
    def prompt(self, question: str, chat: bool = True) -> str:
        """The text the model reads: the chat template's user turn with the picture and the question (as a
        list of parts, as LLaVA's processor templates take them; a text-only template such as SmolLM2's
        gets the LLaVA convention "<image>\n{question}"), the image placeholder expanded to
        `n_image_tokens` image tokens (without chat: "<image>...\n{question}")."""
        question = question.strip()
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not chat:
            text = f"{self.image_token}\n{question}"
        elif not template:
            raise ModelUnavailable("This model has no chat template; HeadScope cannot ask it a question.")
        else:
            text = self._chat([{"type": "image"}, {"type": "text", "text": question}], template)
            if text is None or text.count(self.image_token) != 1:
                text = self._chat(f"{self.image_token}\n{question}", template) or ""
        if text.count(self.image_token) != 1:
            raise ModelUnavailable("This model's chat template does not place exactly one picture in the prompt.")
        return text.replace(self.image_token, self.image_token * self.n_image_tokens)

    def _chat(self, content, template: str) -> str | None:
        """One user turn rendered by `template` with add_generation_prompt; None if the template fails on it."""
        try:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                                      tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - a template written for the other kind of content
            return None

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- image --
    def pixels(self, image) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values  # [3, H, W] float32, shown  # [H, W, 3] uint8)."""
        from capture.images import as_picture, preprocess

        return preprocess(as_picture(image), self.prep)

    def encode(self, image, question: str, chat: bool = True) -> VlmInputs:
        import torch

        pixel_values, shown = self.pixels(image)
        text = self.prompt(question, chat)
        ids = self.token_ids(text)
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != self.n_image_tokens or positions[-1] - positions[0] + 1 != len(positions):
            raise ValueError(f"expected {self.n_image_tokens} consecutive image tokens, found {len(positions)}")
        span = range(positions[0], positions[-1] + 1)
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        for k, i in enumerate(span):
            tokens[i] = f"<img:{k}>"
        patches = span[1:] if len(span) == self.grid[0] * self.grid[1] + 1 else span  # "full": the CLS first
        height, width = shown.shape[:2]
        spans = {"image": patches}
        if patches.start > span.start:
            spans["image_cls"] = range(span.start, patches.start)
        return VlmInputs(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                         torch.from_numpy(pixel_values)[None], span, tokens, shown, text,
                         places=self.family.places(self, None, (width, height)),
                         positions=list(patches), spans=spans)

    def patch_of(self, index: int) -> tuple[int, int]:
        """(row, col) on the grid of the `index`-th image token ("default" strategy: no CLS)."""
        return divmod(index, self.grid[1])


def answer(handle, image, question: str, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The model's short answer to `question` about `image` (PIL image or [H, W, 3] uint8), greedy."""
    return answers(handle, [(image, question)], max_new_tokens)[0]


def greedy_settings(tokenizer, max_new_tokens: int) -> dict:
    """`generate` keyword arguments of every shapes-vlm answer (here, the capture's generation step and
    the batch mode), so all of them write the same text: greedy, stop at the end-of-sequence token."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
    return {"max_new_tokens": max_new_tokens, "do_sample": False, "eos_token_id": eos,
            "pad_token_id": tokenizer.pad_token_id or 0}


def answers(handle, pairs: list[tuple[object, str]], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers for (image, question) pairs, one generate call each (no padding effects)."""
    import torch

    processor: VlmProcessor = handle.tokenizer
    model = handle.model
    settings = greedy_settings(processor.tokenizer, max_new_tokens)
    out = []
    with handle.lock, torch.inference_mode():
        for image, question in pairs:
            inputs = processor.encode(image, question)
            ids = model.generate(**placed(inputs.model_inputs(), model), **settings)
            new = ids[0, inputs.input_ids.shape[1]:]
            out.append(processor.tokenizer.decode(new, skip_special_tokens=True).strip())
    return out


# ---- assembling shapes-vlm from the packaged weights -------------------------------------------------

def llava_config(vision_config, text_config, image_token_id: int):
    """The LlavaConfig of shapes-vlm around given vision (Dinov2Config) and text (LlamaConfig) configs."""
    from transformers import LlavaConfig

    text = text_config.to_dict()
    text["vocab_size"] = max(int(text["vocab_size"]), image_token_id + 1)
    vision = vision_config.to_dict()
    for key in ("out_features", "out_indices", "stage_names", "architectures"):
        vision.pop(key, None)  # backbone fields of the rebuilt DINOv2: not a backbone here
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                       image_seq_length=N_IMAGE_TOKENS, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=VISION_FEATURE_LAYER,
                       multimodal_projector_bias=True, tie_word_embeddings=True,
                       architectures=["LlavaForConditionalGeneration"])


def base_tokenizer():
    """SmolLM2's tokenizer with `<image>` added as a special token (id 49152)."""
    from transformers import AutoTokenizer

    import capture.embedded as embedded

    tokenizer = AutoTokenizer.from_pretrained(str(embedded.smollm2_folder()))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def base_model(seed: int = 0):
    """(LlavaForConditionalGeneration with the packaged DINOv2-small and SmolLM2 weights and a freshly
    initialised projector (deterministic in `seed`), VlmProcessor) — what training starts from."""
    import torch
    from transformers import AutoConfig, Dinov2Model, GenerationConfig, LlamaForCausalLM, LlavaForConditionalGeneration

    import capture.embedded as embedded

    vision_dir, text_dir = embedded.dinov2_folder(), embedded.smollm2_folder()
    tokenizer = base_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = llava_config(AutoConfig.from_pretrained(str(vision_dir)), AutoConfig.from_pretrained(str(text_dir)),
                          image_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    state = {}
    # through from_pretrained: it maps checkpoint names (as on the hub) to the modules' current names
    vision = Dinov2Model.from_pretrained(str(vision_dir), dtype=torch.float32)
    for key, value in vision.state_dict().items():
        state["model.vision_tower." + key] = value
    text = LlamaForCausalLM.from_pretrained(str(text_dir), dtype=torch.float32)
    for key, value in text.state_dict().items():
        if key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value
    embed = state["model.language_model.embed_tokens.weight"]
    extra = config.text_config.vocab_size - embed.shape[0]
    if extra > 0:  # the <image> row: zero (never read as input; logit 0 as output)
        state["model.language_model.embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(extra, embed.shape[1])])
    own = model.state_dict()
    for key in own:
        if key.startswith("model.multi_modal_projector."):
            state[key] = own[key]
    state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"shapes-vlm assembly: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    # SmolLM2's generation settings (eos = <|im_end|>): `generate` stops after the answer
    model.generation_config = GenerationConfig.from_pretrained(str(text_dir))
    model.eval()
    processor = VlmProcessor(tokenizer, shapes_prep(), image_token_id, GRID, N_IMAGE_TOKENS)
    return model, processor


def merge_trained(model, trained: dict) -> None:
    """Load a trained part into `model` in place: projector weights as they are, LoRA pairs merged
    (W <- W + B A, B carries the LoRA scale)."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in trained.items():
            if key.endswith(".lora_A"):
                base = key[: -len(".lora_A")]
                a = value.float()
                b = trained[base + ".lora_B"].float()
                params[base + ".weight"].add_(b @ a)
            elif key.endswith(".lora_B"):
                continue
            else:
                params[key].copy_(value.float())


def trained_path(folder: Path = MODEL_DIR) -> Path:
    return Path(folder) / TRAINED_FILE


def read_settings(folder: Path = MODEL_DIR) -> dict:
    path = Path(folder) / SETTINGS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def assembled_folder(folder: Path = MODEL_DIR) -> Path:
    """The merged shapes-vlm checkpoint in the cache directory, assembled on first use (about half a minute, once)."""
    from cache.store import cache_dir
    import capture.embedded as embedded

    trained = trained_path(folder)
    if not trained.is_file():
        raise ModelUnavailable(f"There is no trained shapes-vlm in {Path(folder)}; run `python -m training.shapes_vlm`.")
    digest = hashlib.sha256(trained.read_bytes()).hexdigest()[:12]
    bases = f"{embedded.embedded_revision('smollm2')}|{embedded.embedded_revision('dinov2-s')}|asm{ASSEMBLER_VERSION}"
    tag = hashlib.sha256(f"{digest}|{bases}".encode()).hexdigest()[:12]

    def build(staging: Path) -> None:
        from safetensors.torch import load_file

        model, processor = base_model()
        merge_trained(model, load_file(str(trained)))
        model.save_pretrained(staging)
        save_processor(processor, staging)
        (staging / "headscope_assembly.json").write_text(json.dumps(
            {"trained": f"{TRAINED_FILE} sha256:{digest}", "bases": bases,
             "vision": "dinov2-s (capture/vision/onnx_dinov2.py)", "text": "smollm2 (GGUF conversion)"}, indent=1))
        for stale in staging.parent.glob("shapes-vlm-" + "[0-9a-f]" * 12):  # older trained parts: 0.6 GB each
            if stale.name != f"shapes-vlm-{tag}":
                shutil.rmtree(stale, ignore_errors=True)

    return embedded.build_once(cache_dir() / "models" / f"shapes-vlm-{tag}", build)


def save_processor(processor: VlmProcessor, folder: Path) -> None:
    """Tokenizer (with <image>), chat template, preprocessor_config.json and processor_config.json."""
    processor.tokenizer.save_pretrained(str(folder))
    p = processor.prep
    prep = {"image_processor_type": "BitImageProcessor", "do_resize": p.do_resize, "size": dict(p.size),
            "resample": p.resample, "do_center_crop": p.do_center_crop, "crop_size": dict(p.crop_size),
            "do_rescale": p.do_rescale, "rescale_factor": p.rescale_factor, "do_normalize": p.do_normalize,
            "image_mean": list(p.image_mean), "image_std": list(p.image_std), "do_convert_rgb": True}
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(prep, indent=2))
    (Path(folder) / "processor_config.json").write_text(json.dumps(
        {"processor_class": "LlavaProcessor", "image_token": processor.image_token, "patch_size": PATCH,
         "vision_feature_select_strategy": processor.strategy, "num_additional_image_tokens": 1}, indent=2))


__all__ = ["VlmProcessor", "answer", "answers", "assembled_folder", "base_model", "merge_trained",
           "llava_config", "shapes_prep", "read_settings", "MODEL_DIR", "GRID", "N_IMAGE_TOKENS", "IMAGE_SIZE"]
