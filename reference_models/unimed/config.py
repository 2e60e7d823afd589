"""The recipe's configuration: YAML files mapped onto dataclasses, checked when loaded.

Sections: ``model`` (vision encoder, token aggregation, connector, LLM, LoRA, tokenizer), ``data`` (synthetic
set or real datasets under a local root, the sampler and mixing ratios), ``train`` (optimiser, schedule,
precision, checkpoints) and ``eval`` (decoding and limits). A wrong key or value raises `CMoEError` naming the
key, what was expected and the known keys. ``--config tiny`` / ``paper`` name the files shipped in
``configs/``; any other value is a path.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cmoe.errors import CMoEError, expect
from cmoe.extras import require
from cmoe.reference_models.unimed.prompt_style import PromptStyle, points, resolve_style
from cmoe.validation import check_field_types, check_values, parse_bool

CONFIG_DIR = Path(__file__).parent / "configs"
BUILTIN_CONFIGS = {"tiny": "tiny.yaml", "paper": "unimed_paper.yaml", "tiny_random": "tiny_random.yaml"}
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
"""The shipped pretrained tiny encoder and LLM (``cmoe unimed pretrain``); configs name it ``${UNIMED_PRETRAINED}``
(the environment variable of that name, when set, points elsewhere)."""
EVAL_PROTOCOLS = ("original", "cmoe")
"""How evaluation scores: ``original`` as the original Uni-Med code (per dataset), ``cmoe`` ours (per task)."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

T = TypeVar("T")


@dataclass
class ComponentConfig:
    """A registered builder by name and the keyword options passed to it (see ``cmoe plugins list``)."""

    _where: ClassVar[str] = "model.<component>"

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self, self._where)


@dataclass
class AggregationConfig:
    """How encoder tokens are merged before the connector: ``reshape`` (the original: ``rate`` consecutive tokens
    concatenated), ``avg`` or ``max`` (``window × window`` pooling of the patch grid), or ``none``."""

    _where: ClassVar[str] = "model.aggregation"

    kind: str = "reshape"
    rate: int = 4
    window: int = 2

    def __post_init__(self) -> None:
        check_field_types(self, self._where)
        expect(self.kind in ("reshape", "avg", "max", "none"), "model.aggregation.kind",
               "one of reshape, avg, max, none", repr(self.kind))
        for name in ("rate", "window"):
            expect(getattr(self, name) >= 1, f"model.aggregation.{name}", "an int >= 1", repr(getattr(self, name)))


@dataclass
class ConnectorSection:
    """The connector: a preset (see `cmoe.reference_models.unimed.model.assembly.CONNECTOR_PRESETS`) and overrides of
    its `CMoEConfig` / `MLPConnectorConfig` fields."""

    _where: ClassVar[str] = "model.connector"

    preset: str = "original"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self, self._where)


@dataclass
class LoraSection:
    """peft LoRA on the LLM (Uni-Med: r 8, alpha 16, dropout 0.05, every linear layer but ``lm_head``).
    ``modules_to_save`` trains full copies of some modules (the tiny config's random-init embeddings and head)."""

    _where: ClassVar[str] = "model.lora"

    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        check_field_types(self, self._where)


@dataclass
class TokenizerSection:
    """``path``: a local tokenizer directory (the LLM's); or ``kind: word_level``: built from the training data."""

    _where: ClassVar[str] = "model.tokenizer"

    kind: str = "pretrained"
    path: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, self._where)
        expect(self.kind in ("pretrained", "word_level"), "model.tokenizer.kind", "pretrained or word_level",
               repr(self.kind))
        expect(self.kind == "word_level" or self.path, "model.tokenizer.path",
               "a local tokenizer directory (or kind: word_level)", self.path)


@dataclass
class ModelSection:
    """The model. ``connector_autocast: float16`` runs the connector under fp16 autocast in training and
    generation, as the original does on a GPU (its ``maybe_autocast``); null keeps the connector's float32 outside
    a training autocast. ``llm_upcast: float32`` loads the LLM in ``dtype`` and then casts its weights to float32
    (the original: fp16 weights upcast by peft's ``prepare_model_for_kbit_training``, run under fp16 autocast)."""
    _where: ClassVar[str] = "model"

    vision_encoder: ComponentConfig
    llm: ComponentConfig
    tokenizer: TokenizerSection
    connector: ConnectorSection = field(default_factory=ConnectorSection)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    max_text_tokens: int = 1024
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    connector_autocast: str | None = None
    llm_upcast: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, self._where)
        expect(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", "float32, bfloat16 or float16",
               repr(self.dtype))
        expect(self.llm_upcast in (None, "float32"), "model.llm_upcast",
               "null (the LLM keeps model.dtype) or float32 (loaded in model.dtype, then cast to float32, as the "
               "original's peft prepare_model_for_kbit_training does)", repr(self.llm_upcast))
        expect(self.connector_autocast in (None, "float16", "bfloat16"), "model.connector_autocast",
               "null (the connector in its own float32), float16 (the original) or bfloat16",
               repr(self.connector_autocast))
        expect(len(self.image_mean) == 3 and len(self.image_std) == 3, "model.image_mean/image_std",
               "three numbers each (RGB)", (self.image_mean, self.image_std))


@dataclass
class DatasetEntry:
    """One real dataset: a loader name (``cmoe.reference_models.unimed.data.loaders.LOADERS``), its local root,
    the mixing ratio, and loader options (e.g. ``limit``). ``mix_source`` names the ``task_ratio`` sampler's source
    the dataset is drawn in (default: its own name): entries that share one are drawn as one source, their
    entries together, so each dataset's share of it follows its size (the original's ``medmnist_2d_small``)."""

    _where: ClassVar[str] = "data.datasets[]"

    name: str
    root: str
    ratio: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    mix_source: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, self._where)


@dataclass
class DataSection:
    """Either ``synthetic`` (options of `SyntheticConfig`, plus ``eval_images`` / ``eval_fraction``) or
    ``datasets`` (real data from local roots). ``sampler``: ``task_ratio`` (the original: one source per batch,
    drawn by ``ratios``), ``mixed`` or ``image_centric``; ``sampler_options`` go to its constructor."""

    _where: ClassVar[str] = "data"

    synthetic: dict[str, Any] | None = None
    datasets: list[DatasetEntry] = field(default_factory=list)
    train_split: str = "train"
    eval_split: str = "test"
    sampler: str = "task_ratio"
    ratios: dict[str, float] | None = None
    sampler_options: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0

    def __post_init__(self) -> None:
        check_field_types(self, self._where)
        expect(self.num_workers >= 0, "data.num_workers", "an int >= 0", repr(self.num_workers))
        expect((self.synthetic is None) != (not self.datasets), "data",
               "exactly one of `synthetic` (built-in set) or `datasets` (real data under local roots)",
               f"synthetic={'set' if self.synthetic is not None else None}, {len(self.datasets)} datasets")
        given: dict[str, float] = {}
        for entry in self.datasets:
            source = entry.mix_source or entry.name
            expect(entry.ratio is None or given.get(source, entry.ratio) == entry.ratio,
                   f"data.datasets[{entry.name}].ratio", f"the ratio of the other entries of mix source {source!r} "
                   f"({given.get(source)}): entries drawn as one source share one ratio", entry.ratio)
            if entry.ratio is not None:
                given[source] = entry.ratio

    def mixing_ratios(self) -> dict[str, float] | None:
        """Mixing ratios by source for the ``task_ratio`` sampler: ``ratios``, else each dataset entry's
        ``ratio`` under its ``mix_source`` (default its name); None means the sampler's default
        (`UNIMED_RATIOS`)."""
        given = {d.mix_source or d.name: d.ratio for d in self.datasets if d.ratio is not None}
        return self.ratios or given or None

    def mixing_groups(self) -> dict[str, str] | None:
        """Dataset name → the ``task_ratio`` source it is drawn in, for the entries that set ``mix_source``
        (None when none does)."""
        return {d.name: d.mix_source for d in self.datasets if d.mix_source} or None


@dataclass
class TrainSection:
    """The original: batch 4, 50k steps, AdamW (0.9, 0.999), wd 0.05, warm-up 5k steps 1e-6 → 1e-5, cosine to
    1e-7, fp16 autocast, seed 42. ``analyze_every`` runs the tug-of-war analysis every N steps (and at step 0)
    on ``analyze_batches_per_task`` fixed batches per image task, into ``output_dir/tug_of_war/``: the JSON
    each time, the plots with each checkpoint and at the end."""

    _where: ClassVar[str] = "train"

    batch_size: int = 4
    steps: int = 50_000
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_steps: int = 5_000
    warmup_start_lr: float = 1e-6
    min_lr: float = 1e-7
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float | None = None
    precision: str = "fp32"
    backend_choice: str = "measure"
    log_every: int = 10
    save_every: int = 1_000
    keep_checkpoints: int = 2
    distributed: str = "ddp"
    progress: bool = True
    analyze_every: int | None = None
    analyze_batches_per_task: int = 2

    def __post_init__(self) -> None:
        check_field_types(self, self._where)
        for name in ("batch_size", "steps", "grad_accum", "log_every", "save_every", "keep_checkpoints"):
            value = getattr(self, name)
            expect(isinstance(value, int) and value >= 1, f"train.{name}", "an int >= 1", repr(value))
        expect(isinstance(self.warmup_steps, int) and 0 <= self.warmup_steps, "train.warmup_steps",
               "an int >= 0", repr(self.warmup_steps))
        for name in ("lr", "warmup_start_lr", "min_lr", "weight_decay"):
            value = getattr(self, name)
            expect(isinstance(value, (int, float)) and value >= 0, f"train.{name}", "a number >= 0", repr(value))
        expect(self.precision in ("fp32", "bf16", "fp16"), "train.precision", "fp32, bf16 or fp16",
               repr(self.precision))
        expect(self.backend_choice in ("measure", "table"), "train.backend_choice",
               "measure (time each dispatch backend on first use, the fastest) or table (a fixed rule: two runs "
               "of one config and seed give the same bits)", repr(self.backend_choice))
        expect(self.distributed in ("ddp", "fsdp"), "train.distributed", "ddp or fsdp", repr(self.distributed))
        expect(self.analyze_every is None or (isinstance(self.analyze_every, int) and self.analyze_every >= 1),
               "train.analyze_every", "None or an int >= 1", repr(self.analyze_every))


@dataclass
class EvalSection:
    """Greedy decoding limits; ``coco_caption`` scores reports with pycocoevalcap's Java PTB tokenizer, BLEU,
    METEOR 1.5 (and, under ``cmoe``, ROUGE-L and CIDEr; METEOR's start-up takes seconds), false skips them.
    ``protocol``: ``original`` scores every dataset as the original code does (its numbers; ``limit_per_task``
    then caps each dataset), ``cmoe`` pools each task's datasets and scores them our way (see
    ``evaluation/evaluate.py``)."""
    _where: ClassVar[str] = "eval"

    max_new_tokens: int = 100
    batch_size: int = 8
    limit_per_task: int | None = None
    coco_caption: bool = True
    protocol: str = "cmoe"

    def __post_init__(self) -> None:
        check_field_types(self, self._where)
        for name in ("max_new_tokens", "batch_size"):
            expect(getattr(self, name) >= 1, f"eval.{name}", "an int >= 1", repr(getattr(self, name)))
        expect(self.limit_per_task is None or self.limit_per_task >= 0, "eval.limit_per_task",
               "None or an int >= 0", repr(self.limit_per_task))
        expect(self.protocol in EVAL_PROTOCOLS, "eval.protocol",
               "original (the original code's scoring, per dataset) or cmoe (ours, per task)", repr(self.protocol))


@dataclass
class PromptsSection:
    """How prompts are worded and answers read (`prompt_style`): ``style: original`` reproduces the original's run
    word for word (the paper config's default), ``cmoe`` is ours; each other key, when set, overrides one point
    of the style (``templates``, ``space_before_inst``, ``eval_bos``, ``cut_answers``, ``pubmedqa_instruction``,
    ``text_processor``, ``tokenizer``, ``resize``)."""

    _where: ClassVar[str] = "prompts"

    style: str = "cmoe"
    templates: str | None = None
    space_before_inst: bool | None = None
    eval_bos: int | None = None
    cut_answers: bool | None = None
    pubmedqa_instruction: str | None = None
    text_processor: str | None = None
    tokenizer: str | None = None
    resize: str | None = None

    def __post_init__(self) -> None:
        check_field_types(self, self._where)
        self.resolved()

    def resolved(self) -> PromptStyle:
        """The style with this section's overrides applied (errors name the known styles, points and values)."""
        return resolve_style(self.style, {point: getattr(self, point) for point in points()})


@dataclass
class RecipeConfig:
    """The whole recipe. ``output_dir`` holds checkpoints, metrics and evaluation tables."""

    _where: ClassVar[str] = ""

    model: ModelSection
    data: DataSection
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    prompts: PromptsSection = field(default_factory=PromptsSection)
    seed: int = 42
    output_dir: str = "runs/unimed"
    name: str = "unimed"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        check_field_types(self, self._where)


def _build(cls: type[T], data: Any, where: str) -> T:
    """`cls` from a mapping, recursing into nested dataclass fields; unknown or missing keys are errors."""
    expect(isinstance(data, dict), where or "config", f"a mapping of {cls.__name__} fields", type(data).__name__)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CMoEError(f"{where or 'config'}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    values = {}
    hints = {name: f.type for name, f in fields.items()}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        nested = _NESTED.get((cls, name))
        if nested is list:
            expect(isinstance(value, list), key, "a list of dataset entries", type(value).__name__)
            value = [_build(DatasetEntry, item, f"{key}[{i}]") for i, item in enumerate(value)]
        elif nested is not None and value is not None:
            value = _build(nested, value, key)
        elif str(hints[name]) == "bool" and isinstance(value, str):
            value = parse_bool(value, key)
        elif "float" in str(hints[name]) and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise CMoEError(f"{key}: expected a number, got {value!r}") from None
        values[name] = value
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise CMoEError(f"{where or 'config'}: missing required key(s) {missing}")
    check_values(cls, values, where)
    return cls(**values)


_NESTED: dict[tuple[type, str], Any] = {
    (RecipeConfig, "model"): ModelSection, (RecipeConfig, "data"): DataSection,
    (RecipeConfig, "train"): TrainSection, (RecipeConfig, "eval"): EvalSection,
    (RecipeConfig, "prompts"): PromptsSection,
    (ModelSection, "vision_encoder"): ComponentConfig, (ModelSection, "llm"): ComponentConfig,
    (ModelSection, "tokenizer"): TokenizerSection, (ModelSection, "connector"): ConnectorSection,
    (ModelSection, "aggregation"): AggregationConfig, (ModelSection, "lora"): LoraSection,
    (DataSection, "datasets"): list,
}


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any],
                    keep_marks: bool = False) -> dict[str, Any]:
    """`overrides` merged into `base` key by key; a mapping with ``_replace: true`` replaces instead. With
    `keep_marks` (layering overrides on overrides) such a mapping keeps its mark, so that it still replaces the
    config's mapping when the layers are finally applied to it."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and value.get("_replace"):
            merged[key] = dict(value) if keep_marks else {k: v for k, v in value.items() if k != "_replace"}
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_overrides(merged[key], value, keep_marks)
        else:
            merged[key] = value
    return merged


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A built-in config name (``tiny``, ``paper``) or a path to a YAML file."""
    if str(name_or_path) in BUILTIN_CONFIGS:
        return CONFIG_DIR / BUILTIN_CONFIGS[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise CMoEError(f"config: {str(name_or_path)!r} is neither a file nor a built-in config; built-in: "
                        f"{', '.join(sorted(BUILTIN_CONFIGS))}")
    return path


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "model.connector.preset=mlp"]`` → a nested dict; values are parsed as YAML."""
    import yaml

    result: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CMoEError(f"override: expected key.path=value, got {item!r}")
        key, value = item.split("=", 1)
        node = result
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return result


def load_config_dict(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The raw mapping of a config file; ``base: other.yaml`` (a built-in name or a path relative to the file)
    is read first and this file's keys merged over it."""
    require("unimed", "the Uni-Med recipe")
    import yaml

    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise CMoEError(f"config {path}: not valid YAML: {error}") from None
    expect(isinstance(data, dict), f"config {path}", "a YAML mapping", type(data).__name__)
    base = data.pop("base", None)
    if base is not None:
        data = merge_overrides(load_config_dict(base if base in BUILTIN_CONFIGS else path.parent / base), data)
    return data


def load_config(name_or_path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """Read a YAML config (with its ``base`` chain), apply `overrides` (a nested dict, see `parse_overrides`)
    and check it."""
    return config_from_dict(merge_overrides(load_config_dict(name_or_path), overrides or {}))


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        default = os.environ.get("UNIMED_PRETRAINED", str(PRETRAINED_DIR))
        return os.path.expandvars(value.replace("${UNIMED_PRETRAINED}", default))
    if isinstance(value, dict):
        return {key: _expand(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item) for item in value]
    return value


def config_from_dict(data: dict[str, Any]) -> RecipeConfig:
    """A checked `RecipeConfig` from a nested mapping; ``$VAR`` / ``${VAR}`` in strings are expanded from the
    environment (paths to local weights and data)."""
    return _build(RecipeConfig, _expand(data), "")
