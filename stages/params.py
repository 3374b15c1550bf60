"""Typed view of params.yaml. Unknown keys, wrong types and out-of-range values fail at load
with the dotted name of the offending field."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = Path(os.environ.get("MANIP_PARAMS", "params.yaml"))

Pos = Annotated[int, Field(gt=0)]
NonNeg = Annotated[int, Field(ge=0)]
Rate = Annotated[float, Field(gt=0, lt=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorldParams(Strict):
    artwork_dir: str = ".cache/emoji-datasource-google"
    size: Annotated[int, Field(ge=32, le=512, multiple_of=8)] = 64
    n_train: Pos = 30000
    n_val: Pos = 1000
    n_test: Pos = 1000
    n_concepts: Pos = 500


class LoopParams(Strict):
    steps: Pos
    batch_size: Pos
    lr: Annotated[float, Field(gt=0, le=1)]
    warmup: NonNeg = 200
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    checkpoint_every: Pos = 500


class VaeParams(Strict):
    block_out_channels: list[Pos] = [32, 64, 64]
    layers_per_block: Pos = 2
    latent_channels: Pos = 8
    norm_num_groups: Pos = 16
    crop: Pos = 32
    kl_weight: Annotated[float, Field(ge=0)] = 1e-6
    train: LoopParams = LoopParams(steps=4000, batch_size=32, lr=1e-3, ema_decay=0.999)


class ClipParams(Strict):
    hidden_size: Pos = 128
    layers: Pos = 4
    heads: Pos = 4
    projection_dim: Pos = 128
    vision_hidden_size: Pos = 128
    vision_layers: Pos = 4
    patch_size: Pos = 8
    train: LoopParams = LoopParams(steps=1500, batch_size=128, lr=1e-3)


class UnetParams(Strict):
    block_out_channels: list[Pos] = [64, 128, 128]
    layers_per_block: Pos = 1
    attention_head_dim: Pos = 8
    train: LoopParams = LoopParams(steps=6000, batch_size=64, lr=5e-4, ema_decay=0.999, checkpoint_every=250)
    uncond_prob: Annotated[float, Field(ge=0, lt=1)] = 0.1


class JudgeParams(Strict):
    width: Pos = 32
    train: LoopParams = LoopParams(steps=6000, batch_size=64, lr=2e-3)


class EvalParams(Strict):
    n_captions: Pos = 200
    images_per_caption: Pos = 4
    steps: Pos = 50
    guidance_scale: Annotated[float, Field(ge=1)] = 7.5
    batch_size: Pos = 40


InversionName = Literal["ddim", "null-text", "negative-prompt", "direct"]


class EditBenchmarkParams(Strict):
    n_cases: Pos = 300
    steps: Pos = 50
    guidance_scale: Annotated[float, Field(ge=1)] = 7.5
    inversions: list[InversionName] = ["ddim", "null-text", "negative-prompt", "direct"]
    null_text_inner_steps: Pos = 10
    cross_replace: Fraction = 0.8
    self_replace: Fraction = 0.4
    local_blend: bool = True
    blend_threshold: Fraction = 0.3
    blend_start: Fraction = 0.2
    batch_size: Pos = 16
    limit_per_run: Pos | None = None

    @field_validator("inversions")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one inversion method")
        if len(set(v)) != len(v):
            raise ValueError(f"inversion methods repeat: {v}")
        return v


class CaptionsParams(Strict):
    source: Literal["emojiworld", "jsonl", "dataset"] = "emojiworld"
    n: Pos = 1000  # EmojiWorld captions, from the train split
    path: str | None = None  # JSONL file, or a saved dataset folder / local dataset name
    column: str = "caption"  # JSONL field or dataset column holding the caption
    id_field: str | None = "id"  # JSONL field with a stable id (else the line number)
    split: str = "train"

    @model_validator(mode="after")
    def _path_given(self) -> "CaptionsParams":
        if self.source != "emojiworld" and not self.path:
            raise ValueError(f"source {self.source!r} needs `path`")
        return self


class OpenAIParams(Strict):
    model: str = "gpt-4o-mini"
    base_url: str | None = None  # else OPENAI_BASE_URL; the key only ever comes from OPENAI_API_KEY
    n_examples: Pos = 16
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.7
    max_tokens: Pos = 200
    json_mode: bool = True
    timeout: Annotated[float, Field(gt=0)] = 30.0
    max_attempts: Pos = 5
    backoff: Annotated[float, Field(ge=0)] = 1.0
    max_backoff: Annotated[float, Field(ge=0)] = 30.0
    concurrency: Pos = 4
    examples_file: str | None = None  # JSONL of {input, edit, output}; default: the shipped examples
    cache_dir: str = ".cache/llm"


EditKindName = Literal["object", "colour", "background", "time", "add", "remove", "style"]


class EditsParams(Strict):
    backend: Literal["rules", "openai"] = "rules"
    kinds: list[EditKindName] = ["object", "colour", "background", "time", "add", "remove", "style"]
    openai: OpenAIParams = OpenAIParams()


Range = tuple[float, float]


class FilterParams(Strict):
    profile: Literal["original", "emojiworld"] = "emojiworld"
    # Overrides of single thresholds of the profile.
    clip_text: float | None = None
    clip_direction: float | None = None
    clip_image: float | None = None


class PairsParams(Strict):
    steps: Pos = 50
    n_samples: Pos = 100
    max_out_samples: Pos = 4
    self_replace: Range = (0.1, 0.9)
    guidance: Range = (7.5, 15.0)
    cross_replace: Fraction | None = None
    batch_size: Pos = 16
    shard_size: Pos = 32
    n_partitions: Pos = 1
    filter: FilterParams = FilterParams()

    @model_validator(mode="after")
    def _ranges(self) -> "PairsParams":
        for name, (lo, hi) in (("self_replace", self.self_replace), ("guidance", self.guidance)):
            if lo > hi:
                raise ValueError(f"{name} must be [low, high], got {[lo, hi]}")
        if not 0 <= self.self_replace[0] <= self.self_replace[1] <= 1:
            raise ValueError(f"self_replace must lie in [0, 1], got {list(self.self_replace)}")
        if self.max_out_samples > self.n_samples:
            raise ValueError(f"max_out_samples ({self.max_out_samples}) exceeds n_samples ({self.n_samples})")
        return self


class DatasetParams(Strict):
    max_per_edit: Pos | None = None  # pairs per caption edit in the dataset; None: all that passed
    rows_per_file: Pos = 2000


class FinetuneParams(Strict):
    train: LoopParams = LoopParams(steps=3000, batch_size=32, lr=2e-4, warmup=100, ema_decay=0.999,
                                   checkpoint_every=250)
    text_drop: Fraction = 0.05
    image_drop: Fraction = 0.05
    both_drop: Fraction = 0.05


class Ip2pEvalParams(Strict):
    n_cases: Pos = 140  # held-out EmojiWorld edits from the test split
    steps: Pos = 50
    guidance_scale: Annotated[float, Field(ge=1)] = 7.5
    image_guidance_scales: list[Annotated[float, Field(ge=1)]] = [1.0, 1.2, 1.5, 1.8, 2.2]
    default_image_guidance: Annotated[float, Field(ge=1)] = 1.5  # the scale reported per edit kind
    batch_size: Pos = 16

    @model_validator(mode="after")
    def _default_scale_listed(self) -> "Ip2pEvalParams":
        if self.default_image_guidance not in self.image_guidance_scales:
            raise ValueError(f"default_image_guidance {self.default_image_guidance} is not in image_guidance_scales")
        return self


class Ip2pParams(Strict):
    captions: CaptionsParams = CaptionsParams()
    edits: EditsParams = EditsParams()
    pairs: PairsParams = PairsParams()
    dataset: DatasetParams = DatasetParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: Ip2pEvalParams = Ip2pEvalParams()


CustomizeMethod = Literal["textual_inversion", "dreambooth", "custom_diffusion", "svdiff", "cones", "lora", "elite"]
WorldConceptName = Literal["teapot", "robot", "cactus", "penguin", "mosaic"]


class CustomizeEvalParams(Strict):
    n_prompts: Pos = 10  # novel-scene prompts per concept
    images_per_prompt: Pos = 4
    steps: Pos = 50
    guidance_scale: Annotated[float, Field(ge=1)] = 7.5
    batch_size: Pos = 40


class EliteEncoderParams(Strict):
    """manip.customize.elite.EncoderConfig, less the seed (the project's)."""

    global_steps: Pos = 1500
    local_steps: Pos = 500
    lr: Annotated[float, Field(gt=0, le=1)] = 1e-4
    batch_size: Pos = 8
    warmup: NonNeg = 100
    checkpoint_every: Pos = 250
    n_words: Pos = 3
    width: Pos = 128
    local_grid: Pos = 8
    word_reg: Annotated[float, Field(ge=0)] = 0.01
    init_word: str = "cat"  # a word the base model was trained on (unseen words have zero embeddings)


class CustomizeParams(Strict):
    concepts: list[WorldConceptName] = ["teapot", "robot", "cactus", "penguin", "mosaic"]
    methods: list[CustomizeMethod] = ["textual_inversion", "dreambooth", "custom_diffusion", "svdiff", "cones", "lora"]
    n_references: Annotated[int, Field(ge=1, le=16)] = 4
    prior_images: Pos = 40  # DreamBooth class images per concept, generated by the base model (cached)
    regularisation_images: Pos = 40  # Custom Diffusion's real class renders per concept
    pairs: list[tuple[WorldConceptName, WorldConceptName]] = [("teapot", "robot")]
    # DreamBooth once more without the prior loss, for the language-drift comparison.
    drift_ablation: bool = True
    # Per-method overrides of the method's config (manip.customize.<method>.<Method>Config fields).
    settings: dict[CustomizeMethod, dict[str, float | int | bool | str]] = {}
    elite_encoder: EliteEncoderParams = EliteEncoderParams()
    evaluate: CustomizeEvalParams = CustomizeEvalParams()

    @model_validator(mode="after")
    def _consistent(self) -> "CustomizeParams":
        for key in ("concepts", "methods"):
            values = getattr(self, key)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{key} must be a non-empty list without repeats, got {values}")
        for a, b in self.pairs:
            if a == b or "mosaic" in (a, b):
                raise ValueError(f"a pair takes two different reserved objects, got ({a}, {b})")
            if a not in self.concepts or b not in self.concepts:
                raise ValueError(f"pair ({a}, {b}) names a concept missing from concepts {self.concepts}")
        return self


EditorName = Literal["imagic", "unitune", "sine", "pix2pix-zero", "p2p", "instruct-pix2pix"]


class EditRunParams(Strict):
    method: EditorName
    # models/base, the InstructPix2Pix model in models/ip2p, or the bilingual models/multilingual
    model: Literal["base", "ip2p", "multilingual"] = "base"
    language: Literal["en", "ru"] = "en"  # of the run's captions, instructions and sentence sets
    settings: dict = {}  # the method's config fields; checked against them when the stage starts

    @model_validator(mode="after")
    def _model_fits_method(self) -> "EditRunParams":
        wanted = ("ip2p",) if self.method == "instruct-pix2pix" else ("base", "multilingual")
        if self.model not in wanted:
            raise ValueError(f"{self.method} edits with model {' or '.join(map(repr, wanted))}, not {self.model!r}")
        if self.language == "ru" and self.model != "multilingual":
            raise ValueError(f"Russian prompts need the multilingual model; model {self.model!r} reads English only")
        return self


class SentencesOpenAIParams(OpenAIParams):
    """A sentence-pairs answer is long (n pairs of captions) and is cached apart from the edits."""
    max_tokens: Pos = 2000
    cache_dir: str = ".cache/llm-sentences"


class SentencesParams(Strict):
    """Where pix2pix-zero's sentence sets come from (README: "Single-image editing methods")."""
    backend: Literal["rules", "openai"] = "rules"
    n: Pos = 16  # sentence pairs per edit
    # rules: the edit in `n` random scene contexts, or the scene's own phrasings alone
    contexts: Literal["random", "scene"] = "random"
    openai: SentencesOpenAIParams = SentencesOpenAIParams()


class EditRunsParams(Strict):
    n_cases: Pos = 36
    reuse_cases: NonNeg = 2
    sentences: SentencesParams = SentencesParams()
    runs: dict[str, EditRunParams] = {}
    limit_per_run: Pos | None = None

    @field_validator("runs")
    @classmethod
    def _some(cls, v: dict) -> dict:
        if not v:
            raise ValueError("name at least one run")
        return v


class StudentParams(Strict):
    """The bilingual tokenizer and the student text encoder distilled from the base one
    (README: "Multilingual prompts"); its width is the base encoder's."""

    # At least the 514 byte and special tokens (manip.multilingual.tokenizer.MIN_VOCAB_SIZE);
    # EmojiWorld's captions stop growing it at about 1,150.
    vocab_size: Annotated[int, Field(ge=514)] = 4096
    layers: Pos = 4
    heads: Pos = 4
    init_from_teacher: bool = True  # token rows the base encoder learnt and its position embeddings
    train: LoopParams = LoopParams(steps=3000, batch_size=64, lr=1e-3, warmup=100)


class MultilingualEvalParams(Strict):
    n_scenes: Pos = 200  # the first test-split scenes
    # Two seeds at least: the similarity of two English samples is the consistency reference.
    images_per_scene: Annotated[int, Field(ge=2)] = 4
    steps: Pos = 50
    guidance_scale: Annotated[float, Field(ge=1)] = 7.5
    batch_size: Pos = 40


class InstructionStudentParams(Strict):
    """The InstructPix2Pix model that reads Russian instructions (stage `ip2p_multilingual`):
    the bilingual student, fine-tuned on the rules backend's instructions in both languages."""

    n_scenes: Pos = 20000  # train-split scenes, one edit each (where one applies), in English and in Russian
    n_test: Pos = 1000  # test-split scenes whose instruction pairs measure the held-out error
    train: LoopParams = LoopParams(steps=1500, batch_size=64, lr=3e-4, warmup=50, checkpoint_every=250)


class MultilingualParams(Strict):
    student: StudentParams = StudentParams()
    evaluate: MultilingualEvalParams = MultilingualEvalParams()
    ip2p: InstructionStudentParams = InstructionStudentParams()


class Params(Strict):
    seed: NonNeg = 0
    world: WorldParams = WorldParams()
    vae: VaeParams = VaeParams()
    text_encoder: ClipParams = ClipParams(vision_hidden_size=96, vision_layers=3)
    unet: UnetParams = UnetParams()
    evaluator: ClipParams = ClipParams(train=LoopParams(steps=2000, batch_size=128, lr=1e-3))
    judge: JudgeParams = JudgeParams()
    evaluate: EvalParams = EvalParams()
    edit_benchmark: EditBenchmarkParams = EditBenchmarkParams()
    ip2p: Ip2pParams = Ip2pParams()
    customize: CustomizeParams = CustomizeParams()
    edit_runs: EditRunsParams = EditRunsParams(runs={"p2p-null-text": EditRunParams(method="p2p")})
    multilingual: MultilingualParams = MultilingualParams()


class ParamsError(ValueError):
    pass


def read_yaml(path: str | Path) -> dict:
    """The raw mapping in a params file, or a ParamsError saying why there is none."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found (run from the project root, or set MANIP_PARAMS)")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err


def field_errors(err: ValidationError, prefix: str = "") -> list[str]:
    """One line per invalid field, named by its dotted path."""
    return [f"{prefix}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    raw = read_yaml(path)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"invalid {path}:\n  " + "\n  ".join(field_errors(err))) from None
