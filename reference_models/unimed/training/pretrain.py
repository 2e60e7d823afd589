"""``cmoe unimed pretrain``: the tiny recipe's frozen components, pretrained on the project's synthetic data.

Why: Uni-Med freezes a *pretrained* vision encoder (EVA-CLIP) and a *pretrained* LLM (LLaMA-2, + LoRA) and
trains only the connector. With random-init tiny components nothing visual is learnt (see
``docs/experiments/cmoe_vs_mlp``), so this module makes small stand-ins from the synthetic set itself:

* **vision encoder** (the tiny config's 2-layer CLIP): supervised heads on its last hidden state (what the
  recipe feeds the connector, CLS dropped). Per patch token: the soft mix of background / each organ / lesion
  under the patch (location, extent, organ identity) and the modality (texture); per image, on the mean patch
  token: modality, body region, organs shown, organ count, lesion quadrant, size and brightness. Labels come
  from the scene's ground truth; the organ map is the same scene rendered without texture, whose grey levels
  are exact. Images mix texture amplitudes 10 and 30 (the tiny default and the experiments').
* **LLM** (the tiny config's 2-layer LLaMA): a causal language model over the synthetic text — every task's
  prompt and answer with the image left out, reports and QA included — with a fixed word-level tokenizer that
  covers every word the generator can emit (`VOCABULARY`).

Both are saved with ``save_pretrained`` (``vision_encoder/``, ``llm/`` with its tokenizer), the folders
``build_hf_clip(path=...)``, ``build_hf_causal_lm(path=...)`` and the pretrained tokenizer load. `probe_table`
measures what the encoder's features carry: a linear probe per attribute on held-out images, random-init vs
pretrained, written to ``probes.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmoe.errors import CMoEError, expect
from cmoe.reference_models.unimed.config import CLIP_MEAN, CLIP_STD, PRETRAINED_DIR
from cmoe.reference_models.unimed.data.images import preprocess_images
from cmoe.reference_models.unimed.data.synthetic import (
    LESION_LEVELS,
    LESION_RADII,
    MODALITIES,
    ORGAN_LEVELS,
    QUADRANTS,
    REGIONS,
    VOCABULARY,
    Scene,
    SyntheticConfig,
    generate,
    make_scene,
)
from cmoe.reference_models.unimed.prompts import build_prompt, split_at_image
from cmoe.reference_models.unimed.tasks import get_task

ENCODER_CONFIG: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "image_size": 32, "patch_size": 4}
LLM_CONFIG: dict[str, Any] = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
                              "max_position_embeddings": 256}
"""The tiny config's architectures (``configs/tiny_random.yaml``); the pretrained weights have these shapes."""

ORGANS: tuple[str, ...] = tuple(ORGAN_LEVELS)
PATCH_CLASSES: tuple[str, ...] = ("background", *ORGANS, "lesion")
"""Per-patch classes of the encoder's dense head (and of the per-token probe)."""

GLOBAL_HEADS: dict[str, int] = {"modality": len(MODALITIES), "region": len(REGIONS), "count": 3,
                                "lesion_quadrant": len(QUADRANTS) + 1, "lesion_size": len(LESION_RADII) + 1,
                                "lesion_kind": len(LESION_LEVELS) + 1}
"""Image-level classification heads (lesion heads: class 0 = no lesion)."""


@dataclass
class PretrainConfig:
    """Budgets and seeds of `pretrain`. The defaults build the shipped weights (about 10 CPU-minutes on 2 cores).

    ``data_seed`` draws scenes apart from the recipe's (seed 0) training and test images.
    """

    seed: int = 0
    data_seed: int = 1000
    image_size: int = 32
    encoder_images: int = 4000
    encoder_steps: int = 2000
    encoder_batch: int = 64
    encoder_lr: float = 2e-3
    llm_images: int = 2000
    llm_steps: int = 400
    llm_batch: int = 64
    llm_lr: float = 3e-3
    probe_train_images: int = 1500
    probe_test_images: int = 500
    probe_steps: int = 300

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            expect(isinstance(value, (int, float)) and value >= 0, name, "a number >= 0", repr(value))


def pretrain_config(items: list[str]) -> PretrainConfig:
    """A `PretrainConfig` from ``key=value`` overrides (the command line's ``--set``)."""
    known = {f.name for f in fields(PretrainConfig)}
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        expect(sep == "=" and key in known, "--set", f"key=value with a key among {sorted(known)}", repr(item))
        try:
            values[key] = float(value) if "." in value or "e" in value else int(value)
        except ValueError:
            raise CMoEError(f"--set {key}: expected a number, got {value!r}") from None
    return PretrainConfig(**values)


# --- data ------------------------------------------------------------------------------------------------


@dataclass
class SceneSet:
    """Preprocessed images and their labels: ``pixels [N, 3, S, S]``, ``patch [N, P, C]`` (class fractions per
    patch), ``organs [N, 12]`` (shown or not) and one int per image for each of `GLOBAL_HEADS`."""

    pixels: torch.Tensor
    patch: torch.Tensor
    organs: torch.Tensor
    labels: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def take(self, index: torch.Tensor) -> SceneSet:
        return SceneSet(self.pixels[index], self.patch[index], self.organs[index],
                        {k: v[index] for k, v in self.labels.items()})


def _pixel_classes(scene: Scene, clean: np.ndarray) -> np.ndarray:
    """Per-pixel class index in `PATCH_CLASSES` from the texture-free rendering of `scene`."""
    classes = np.zeros(clean.shape, dtype=np.int64)
    for organ in scene.organs:
        classes[clean == organ.level] = PATCH_CLASSES.index(organ.name)
    classes[np.isin(clean, list(LESION_LEVELS.values()))] = len(PATCH_CLASSES) - 1
    return classes


def _scene_labels(scene: Scene) -> dict[str, int]:
    lesion = scene.lesion
    return {"modality": MODALITIES.index(scene.modality), "region": list(REGIONS).index(scene.region),
            "count": len(scene.organs) - 1,
            "lesion_quadrant": 0 if lesion is None else QUADRANTS.index(lesion.quadrant) + 1,
            "lesion_size": 0 if lesion is None else list(LESION_RADII).index(lesion.size) + 1,
            "lesion_kind": 0 if lesion is None else list(LESION_LEVELS).index(lesion.kind) + 1}


def make_scene_set(count: int, seed: int, start: int = 0, image_size: int = 32, patch_size: int = 4,
                   amplitudes: tuple[int, ...] = (10, 30)) -> SceneSet:
    """Scenes ``start .. start+count`` of the synthetic ``dense`` stream of `seed`, texture amplitudes cycling
    through `amplitudes`, with every label the encoder is trained and probed on."""
    images, patches, organs = [], [], []
    labels: dict[str, list[int]] = {name: [] for name in GLOBAL_HEADS}
    grid = image_size // patch_size
    for index in range(start, start + count):
        config = SyntheticConfig(image_size=image_size, seed=seed,
                                 texture_amplitude=amplitudes[index % len(amplitudes)])
        scene = make_scene(config, index)
        clean = make_scene(replace(config, texture_amplitude=0), index).image
        classes = _pixel_classes(scene, clean).reshape(grid, patch_size, grid, patch_size).transpose(0, 2, 1, 3)
        onehot = np.eye(len(PATCH_CLASSES), dtype=np.float32)[classes.reshape(grid * grid, -1)]
        patches.append(onehot.mean(1))
        organs.append([float(any(o.name == name for o in scene.organs)) for name in ORGANS])
        for name, value in _scene_labels(scene).items():
            labels[name].append(value)
        images.append(scene.image)
    pixels = preprocess_images(images, image_size, CLIP_MEAN, CLIP_STD)
    return SceneSet(pixels, torch.from_numpy(np.stack(patches)), torch.tensor(organs),
                    {name: torch.tensor(values) for name, values in labels.items()})


# --- vision encoder --------------------------------------------------------------------------------------


def build_encoder(seed: int):
    """The tiny config's CLIP vision tower with random weights drawn from `seed`."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(**ENCODER_CONFIG))


def patch_features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the recipe feeds the connector: the last hidden state without CLS, ``[N, patches, width]``."""
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]


class EncoderHeads(nn.Module):
    """Linear heads on the patch tokens (organ map, modality per token) and on their mean (image labels)."""

    def __init__(self, width: int):
        super().__init__()
        self.patch = nn.Linear(width, len(PATCH_CLASSES))
        self.token_modality = nn.Linear(width, len(MODALITIES))
        self.organs = nn.Linear(width, len(ORGANS))
        self.image = nn.ModuleDict({name: nn.Linear(width, n) for name, n in GLOBAL_HEADS.items()})

    def loss(self, features: torch.Tensor, data: SceneSet, class_weights: torch.Tensor | None = None) -> torch.Tensor:
        pooled = features.mean(1)
        loss = F.cross_entropy(self.patch(features).flatten(0, 1), data.patch.flatten(0, 1), weight=class_weights)
        modality = data.labels["modality"][:, None].expand(-1, features.shape[1])
        loss = loss + F.cross_entropy(self.token_modality(features).flatten(0, 1), modality.flatten())
        loss = loss + F.binary_cross_entropy_with_logits(self.organs(pooled), data.organs)
        for name, head in self.image.items():
            loss = loss + F.cross_entropy(head(pooled), data.labels[name])
        return loss


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over 5 % of the steps, then cosine to zero."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + np.cos(np.pi * min(1.0, s / max(1, steps)))))


def train_encoder(config: PretrainConfig, data: SceneSet, log=print) -> nn.Module:
    """The tiny CLIP tower trained with `EncoderHeads` on `data`; returns the tower (heads dropped)."""
    model = build_encoder(config.seed)
    heads = EncoderHeads(model.config.hidden_size)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.encoder_lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, config.encoder_steps)
    generator = torch.Generator().manual_seed(config.seed)
    # Background fills ~88 % of the patches and lesions ~0.5 %: weight the patch classes by frequency^-1/2.
    frequency = data.patch.mean((0, 1)).clamp(min=1e-4)
    class_weights = frequency.rsqrt() / (frequency * frequency.rsqrt()).sum()
    model.train()
    for step in range(config.encoder_steps):
        index = torch.randint(len(data), (config.encoder_batch,), generator=generator)
        batch = data.take(index)
        loss = heads.loss(patch_features(model, batch.pixels), batch, class_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % max(1, config.encoder_steps // 10) == 0:
            log(f"encoder step {step + 1}/{config.encoder_steps}: loss {float(loss.detach()):.4f}")
    return model.eval()


# --- linear probes ---------------------------------------------------------------------------------------


def _fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
               classes: int, steps: int) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised inputs, small L2, Adam)."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator().manual_seed(0)
    probe = nn.Linear(train_x.shape[1], classes)
    with torch.no_grad():
        probe.weight.normal_(0, 0.01, generator=generator)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(probe(train_x), train_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe(test_x).argmax(-1) == test_y).float().mean())


PROBE_ATTRIBUTES: dict[str, str] = {
    "modality (texture)": "the imaging modality, i.e. the global texture (cls)",
    "body region": "chest / brain / abdomen / pelvis (vqa, report)",
    "organ count": "1, 2 or 3 organs shown (vqa)",
    "lesion presence": "abnormal or not (vqa, report)",
    "lesion quadrant": "none or one of four quadrants (vqa, report)",
    "lesion size": "none / small / large (vqa, report)",
    "lesion brightness": "none / bright / dark (vqa, report)",
    "patch content": "which of 12 organs or a lesion lies under a non-background patch token (rec, reg, vqa)",
}
"""The probed attributes and the tasks that need them."""


def _targets(data: SceneSet) -> dict[str, tuple[torch.Tensor, int]]:
    labels = data.labels
    return {"modality (texture)": (labels["modality"], len(MODALITIES)),
            "body region": (labels["region"], len(REGIONS)),
            "organ count": (labels["count"], 3),
            "lesion presence": ((labels["lesion_quadrant"] > 0).long(), 2),
            "lesion quadrant": (labels["lesion_quadrant"], len(QUADRANTS) + 1),
            "lesion size": (labels["lesion_size"], len(LESION_RADII) + 1),
            "lesion brightness": (labels["lesion_kind"], len(LESION_LEVELS) + 1)}


def _object_patches(data: SceneSet) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, patch) index pairs of the patches whose main content is not background, and that content."""
    content = data.patch.argmax(-1)
    where = torch.nonzero(content > 0)
    return where, content[where[:, 0], where[:, 1]]


@torch.no_grad()
def _features(model: nn.Module, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([patch_features(model, pixels[i:i + batch]) for i in range(0, len(pixels), batch)])


def probe_accuracies(model: nn.Module, train: SceneSet, test: SceneSet, steps: int = 300) -> dict[str, float]:
    """Held-out linear-probe accuracy per attribute of `PROBE_ATTRIBUTES`: image attributes from the mean patch
    token, the patch content from each non-background patch token alone."""
    train_f, test_f = _features(model, train.pixels), _features(model, test.pixels)
    results = {}
    train_t, test_t = _targets(train), _targets(test)
    for name, (labels, classes) in train_t.items():
        results[name] = _fit_probe(train_f.mean(1), labels, test_f.mean(1), test_t[name][0], classes, steps)
    (train_at, train_y), (test_at, test_y) = _object_patches(train), _object_patches(test)
    results["patch content"] = _fit_probe(train_f[train_at[:, 0], train_at[:, 1]], train_y,
                                          test_f[test_at[:, 0], test_at[:, 1]], test_y, len(PATCH_CLASSES), steps)
    return results


def majority_accuracies(train: SceneSet, test: SceneSet) -> dict[str, float]:
    """Accuracy of always answering the training set's most frequent class (the floor of every probe)."""
    pairs = {name: (labels, test_labels) for (name, (labels, _)), (_, (test_labels, _))
             in zip(_targets(train).items(), _targets(test).items())}
    pairs["patch content"] = (_object_patches(train)[1], _object_patches(test)[1])
    return {name: float((test_labels == torch.bincount(labels).argmax()).float().mean())
            for name, (labels, test_labels) in pairs.items()}


def probe_sets(config: PretrainConfig) -> tuple[SceneSet, SceneSet]:
    """The probes' training and held-out images: the scenes after the pretraining ones in the same stream."""
    start = config.encoder_images
    train = make_scene_set(config.probe_train_images, config.data_seed, start, config.image_size)
    test = make_scene_set(config.probe_test_images, config.data_seed, start + config.probe_train_images,
                          config.image_size)
    return train, test


def probe_table(encoder: nn.Module, config: PretrainConfig) -> dict[str, dict[str, float]]:
    """``{attribute: {majority, random_init, pretrained}}`` on fresh probe images (a stream start past the
    pretraining images), the random-init encoder drawn from the same seed as the one trained."""
    train, test = probe_sets(config)
    majority = majority_accuracies(train, test)
    random_init = probe_accuracies(build_encoder(config.seed), train, test, config.probe_steps)
    pretrained = probe_accuracies(encoder, train, test, config.probe_steps)
    return {name: {"majority": majority[name], "random_init": random_init[name], "pretrained": pretrained[name]}
            for name in PROBE_ATTRIBUTES}


def format_probe_table(table: dict[str, dict[str, float]]) -> str:
    lines = ["| attribute (needed by) | majority class | random-init encoder | pretrained encoder |",
             "|---|---|---|---|"]
    for name, row in table.items():
        lines.append(f"| {name}: {PROBE_ATTRIBUTES[name]} | {row['majority']:.1%} | {row['random_init']:.1%} | "
                     f"{row['pretrained']:.1%} |")
    return "\n".join(lines)


# --- LLM -------------------------------------------------------------------------------------------------


def build_tokenizer():
    """The fixed word-level tokenizer of the pretrained tiny LLM: every word the synthetic generator and the
    prompt template can emit (`VOCABULARY`), so no recipe text maps to ``<unk>``."""
    from cmoe.reference_models.unimed.model.tokenizer import build_word_tokenizer

    return build_word_tokenizer([" ".join(VOCABULARY)])


def lm_texts(config: PretrainConfig) -> list[str]:
    """The language-model corpus: each synthetic entry's prompt with the image part left out, its answer and
    ``</s>`` (every task, QA included), from scenes apart from the recipe's."""
    samples = generate(SyntheticConfig(num_images=config.llm_images, image_size=config.image_size,
                                       seed=config.data_seed + 1, qa_questions=config.llm_images // 4))
    texts = []
    for sample in samples:
        prompt = build_prompt(get_task(sample.task), sample.fields, answer=sample.answer)
        pieces = split_at_image(prompt.prompt)
        text = prompt.prompt if pieces is None else "".join(pieces).replace("<Img></Img>", "<Img> </Img>")
        texts.append(f"{text} {prompt.answer}")
    return texts


def train_llm(config: PretrainConfig, tokenizer, log=print) -> tuple[nn.Module, list[float]]:
    """The tiny LLaMA trained as a causal LM on `lm_texts` (loss on every token), and its loss per step."""
    from transformers import AutoConfig, AutoModelForCausalLM

    texts = lm_texts(config)
    ids = [[tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False).input_ids] for text in texts]
    options = {k: v for k, v in LLM_CONFIG.items() if k != "model_type"}
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        LLM_CONFIG["model_type"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **options))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.llm_lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, config.llm_steps)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    losses = []
    for step in range(config.llm_steps):
        rows = [ids[i] for i in torch.randint(len(ids), (config.llm_batch,), generator=generator).tolist()]
        length = max(map(len, rows))
        input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (length - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, config.llm_steps // 10) == 0:
            log(f"llm step {step + 1}/{config.llm_steps}: loss {losses[-1]:.4f}")
    return model.eval(), losses


# --- the command -----------------------------------------------------------------------------------------


def pretrain(out: str | Path | None = None, config: PretrainConfig | None = None, log=print,
             probes: bool = True) -> dict[str, Any]:
    """Pretrain the tiny encoder and LLM, save them under `out` (``vision_encoder/``, ``llm/``) with
    ``pretrain.json`` (budgets, seeds, timings, the probe table). Returns that record."""
    config = config or PretrainConfig()
    out = Path(out or PRETRAINED_DIR)
    torch.manual_seed(config.seed)
    record: dict[str, Any] = {"config": asdict(config), "seconds": {}}
    started = time.perf_counter()
    data = make_scene_set(config.encoder_images, config.data_seed, 0, config.image_size)
    record["seconds"]["encoder_data"] = time.perf_counter() - started
    started = time.perf_counter()
    encoder = train_encoder(config, data, log)
    record["seconds"]["encoder"] = time.perf_counter() - started
    encoder.save_pretrained(out / "vision_encoder")
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    llm, losses = train_llm(config, tokenizer, log)
    record["seconds"]["llm"] = time.perf_counter() - started
    tail = max(1, len(losses) // 10)
    record["llm_loss"] = {"first": losses[0], "last_tenth_mean": float(np.mean(losses[-tail:]))}
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    if probes:
        started = time.perf_counter()
        record["probes"] = probe_table(encoder, config)
        record["seconds"]["probes"] = time.perf_counter() - started
        log(format_probe_table(record["probes"]))
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
