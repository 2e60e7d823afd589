"""Linear probes of what the encoder's features carry, random-init vs pretrained (`probe_table`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.reference_models.unimed.data.synthetic import LESION_LEVELS, LESION_RADII, MODALITIES, QUADRANTS, REGIONS
from cmoe.reference_models.unimed.training.pretrain.config import PATCH_CLASSES, PretrainConfig
from cmoe.reference_models.unimed.training.pretrain.encoder import build_encoder, patch_features
from cmoe.reference_models.unimed.training.pretrain.scenes import SceneSet, make_scene_set


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
