"""The paper config's run against the original Uni-Med's own code, stage by stage and dataset by dataset.

The golden files (tests/data/unimed_original_run/: golden.json, golden.safetensors, the tiny shared LLM and
tokenizer, an original checkpoint) come from running tsinghua-msiip/Uni-Med @63b9dfb unchanged in a scratch venv
with its pins (transformers 4.30, peft 0.7.1, sentencepiece 0.1.99): tests/golden/original_venv.sh and
tests/golden/make_original_run.py, on the raw datasets tests/golden/original_run_data.py writes (golden.json's
"produced_by" lists every harness patch, e.g. the EVA ViT replaced by a stub). Here our side reads the same raw
files with the ``paper`` config (``prompts: original``), converts the same checkpoint, builds the same tiny model
and must give, for each of the twelve datasets: the text processor's and the slow tokenizer's outputs, every
training instruction with every pool template, the answers, the pixels, the training sequences (token ids, image
rows, labels), the loss and logits (float32, 1e-5), the evaluation prompts' ids, the greedy tokens and the
answers as the original returns them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from cmoe.reference_models.unimed.config import load_config, merge_overrides, parse_overrides
from cmoe.reference_models.unimed.data.images import preprocess_images
from cmoe.reference_models.unimed.data.splits import load_split
from cmoe.reference_models.unimed.evaluation.evaluate import load_trained_model
from cmoe.reference_models.unimed.evaluation.original_protocol import clean_prediction
from cmoe.reference_models.unimed.model.collate import IMAGE_TASKS, Collator, sample_prompt
from cmoe.reference_models.unimed.model.sentencepiece_llama import OriginalLlamaTokenizer
from cmoe.reference_models.unimed.paper.convert import convert_original_checkpoint
from cmoe.reference_models.unimed.prompt_style import PROMPT_STYLES
from cmoe.reference_models.unimed.text_processing import original_text
from cmoe.registry import VISION_ENCODERS

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "data" / "unimed_original_run"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "golden"))
from original_run_data import write_datasets  # noqa: E402

GOLDEN = json.loads((GOLDEN_DIR / "golden.json").read_text())
STYLE = PROMPT_STYLES["original"]
TRAIN_SETS = {"medqa_en": ("medqa",), "pubmedqa": ("pubmedqa",), "slakevqa_en": ("slake_vqa",),
              "path_vqa": ("pathvqa",), "ref_slake": ("slake_rec",), "invref_slake": ("slake_reg",),
              "ref_sa_med": ("samed2d_rec",), "invref_sa_med": ("samed2d_reg",), "medpix_single": ("medpix",),
              "mimic_caption": ("mimic_cxr",), "medmnist_2d_small": ("dermamnist", "organsmnist")}
"""The original's training datasets → our loaders (its medmnist_2d_small concatenates the two MedMNIST sets)."""
EVAL_SETS = {"slakevqa_en": "slake_vqa", "path_vqa": "pathvqa", "ref_slake": "slake_rec", "ref_sa_med": "samed2d_rec",
             "invref_slake": "slake_reg", "invref_sa_med": "samed2d_reg", "mimic_caption": "mimic_cxr",
             "medpix_single": "medpix", "medmnist_2d_derma": "dermamnist", "medmnist_2d_organs": "organsmnist",
             "medqa_en": "medqa", "pubmedqa": "pubmedqa"}
STUB = "original_run_stub"


class StubEncoder(torch.nn.Module):
    """The stub that stands in for EVA-CLIP in the golden run: token t = W · mean RGB of 8×8 patch t + b, the 16
    patches of a 32×32 image in row-major order (the original's CLS token is dropped by its ``encode_img``)."""

    out_features, image_size, num_patches = 8, 32, 16

    def __init__(self) -> None:
        super().__init__()
        stub = GOLDEN["vision_stub"]
        self.register_buffer("weight", torch.tensor(stub["weight"]))
        self.register_buffer("bias", torch.tensor(stub["bias"]))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        b = pixel_values.shape[0]
        patches = pixel_values.view(b, 3, 4, 8, 4, 8).mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # [B, 16, 3]
        return patches @ self.weight.T + self.bias


@pytest.fixture(scope="module")
def stub_encoder() -> None:
    """The stub registered for this module's model (other tests reload the registries, so not at import)."""
    if STUB not in VISION_ENCODERS.names():
        VISION_ENCODERS.register(STUB, lambda: StubEncoder().requires_grad_(False), origin="tests")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("original_run_data")
    write_datasets(root)
    return root


@pytest.fixture(scope="module")
def config(data_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The paper config (its data, mix and ``prompts: original``) with the golden run's tiny model."""
    llm = str(GOLDEN_DIR / "llm")
    conversion = convert_original_checkpoint(GOLDEN_DIR / "checkpoint_0.pth", tmp_path_factory.mktemp("converted"),
                                             tokenizer=llm)
    model = {"_replace": True, "vision_encoder": {"name": STUB}, "aggregation": {"kind": "reshape", "rate": 4},
             "llm": {"name": "hf_causal_lm", "options": {"path": llm}},
             "lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.05},
             "tokenizer": {"kind": "pretrained", "path": llm}, "dtype": "float16", "llm_upcast": "float32"}
    # the flags the converter prints (preset, widths, LoRA) over the tiny model
    overrides = merge_overrides({"model": model, "eval": {"batch_size": 16}}, parse_overrides(conversion.overrides),
                                keep_marks=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UNIMED_DATA", str(data_root))
        patch.setenv("UNIMED_MODELS", str(data_root / "unused"))
        loaded = load_config("paper", overrides)
    return loaded, conversion.output_dir


@pytest.fixture(scope="module")
def model(config, stub_encoder):
    config, checkpoint = config
    built, _ = load_trained_model(config, checkpoint)
    return built


@pytest.fixture(scope="module")
def splits(config):
    config, _ = config
    return {split: load_split(config.data, split, "original") for split in ("train", "test")}


def _ours(samples, names) -> list:
    return [s for s in samples if s.source in names]


@pytest.mark.parametrize("case", GOLDEN["text_processor"], ids=lambda c: repr(c["input"])[:30])
def test_text_processor_is_blip_caption_new(case: dict) -> None:
    assert original_text(case["input"]) == case["output"]


def test_tokenizer_encodes_and_decodes_as_the_slow_llama_tokenizer_of_transformers_4_30() -> None:
    golden = GOLDEN["tokenizer"]
    tokenizer = OriginalLlamaTokenizer(GOLDEN_DIR / "tokenizer.model")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == \
        (golden["bos_token_id"], golden["eos_token_id"], golden["pad_token_id"])
    for case in golden["encode"]:
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]
        assert tokenizer.encode(case["text"], add_special_tokens=True) == case["ids_with_bos"], case["text"]
    assert len(golden["decode"]) >= 20
    for case in golden["decode"]:
        assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["skip_special_tokens"], case["ids"]
        assert tokenizer.decode(case["ids"]) == case["keep_special_tokens"], case["ids"]


@pytest.mark.parametrize("name", TRAIN_SETS)
def test_training_instructions_with_every_template_and_answers(name: str, splits) -> None:
    golden = GOLDEN["datasets"][name]["train"]
    ours = _ours(splits["train"], TRAIN_SETS[name])
    assert len(ours) == golden["len"]
    for entry, sample in zip(golden["entries"], ours):
        for template in entry["templates"]:
            drawn = dataclasses.replace(sample, meta={**sample.meta, "template": template["k"]})
            parts = sample_prompt(drawn, STYLE, training=True)
            assert parts.prompt == f"[INST] {template['instruction_input']} [/INST]"
            assert sample.answer == template["answer"]


@pytest.mark.parametrize("name", EVAL_SETS)
def test_evaluation_prompts_and_references(name: str, splits) -> None:
    golden = GOLDEN["model"]["eval"].get(name) or GOLDEN["model"]["eval_text_only"][name]
    ours = [s for s in splits["test"] if s.source == EVAL_SETS[name]]
    # the original writes "<s>" into the prompt and the tokenizer adds BOS: ours asks with two BOS ids (eval_bos: 2)
    assert ["<s>" + sample_prompt(s, STYLE, training=False).prompt for s in ours] == golden["prompts"]
    for dataset in GOLDEN["datasets"].values():
        if name in (dataset.get("eval") or {}):
            entries = dataset["eval"][name]["entries"]
            references = [e.get("answers_gt", e.get("answer_gt")) for e in entries]
            if references[0] is not None:
                assert [s.answer for s in ours] == references


@pytest.mark.parametrize("name", [n for n in TRAIN_SETS if n not in ("medqa_en", "pubmedqa")])
def test_pixels_as_the_original_vis_processor(name: str, splits) -> None:
    """The first training and evaluation image of each dataset, resized width first as Pillow 10.0.1 does (the
    medpix test set's second image, 36×60, is where one call to today's Pillow differs: its greedy answer in
    `test_evaluation_ids_greedy_tokens_and_answers` changes without it)."""
    from safetensors.torch import load_file

    tensors = load_file(GOLDEN_DIR / "golden.safetensors")
    first = _ours(splits["train"], TRAIN_SETS[name])[0]
    torch.testing.assert_close(preprocess_images([first.image], 32, STYLE_MEAN, STYLE_STD, width_first=True)[0],
                               tensors[f"pixels/{name}/train/0"], rtol=0, atol=1e-6)
    for eval_set, source in EVAL_SETS.items():
        if source in TRAIN_SETS[name] and f"pixels/{eval_set}/eval/0" in tensors:
            image = next(s.image for s in splits["test"] if s.source == source)
            torch.testing.assert_close(preprocess_images([image], 32, STYLE_MEAN, STYLE_STD, width_first=True)[0],
                                       tensors[f"pixels/{eval_set}/eval/0"], rtol=0, atol=1e-6)


STYLE_MEAN = (0.48145466, 0.4578275, 0.40821073)
STYLE_STD = (0.26862954, 0.26130258, 0.27577711)


def _rows(text, image_tokens: int) -> list[int]:
    return text.before + [-1] * (image_tokens if text.has_image else 0) + text.after + text.answer


@pytest.mark.parametrize("name", TRAIN_SETS)
def test_training_batch_sequences_labels_loss_and_logits(name: str, model, splits) -> None:
    from safetensors.torch import load_file

    golden = GOLDEN["model"]["train_batches"][name]
    ours = _ours(splits["train"], TRAIN_SETS[name])
    picked = [dataclasses.replace(ours[i], meta={**ours[i].meta, "template": k})
              for i, k in zip(golden["indices"], golden["k"])]
    collator = Collator(model.tokenizer, 32, STYLE_MEAN, STYLE_STD, 1024, with_answers=True, style=STYLE)
    batch = collator(picked)
    for text, sample in zip(batch.texts, golden["samples"]):
        rows = _rows(text, 4)
        assert rows == sample["sequence"]
        labels = [-100] * (len(rows) - len(text.answer)) + text.answer
        assert labels == sample["targets"]
    with torch.no_grad():
        out = model(batch)
        sequences, labels, _ = model._sequences(batch, with_answers=True)
        logits = [model.llm(inputs_embeds=seq[None]).logits[0] for seq in sequences]
    assert float(out.aux_loss) == 0.0
    assert abs(float(out.loss) - golden["loss"]) < 1e-5 * max(1.0, abs(golden["loss"]))
    expected = load_file(GOLDEN_DIR / "golden.safetensors")[f"train/{name}/logits"]
    offset = 0
    # float32 on both sides, different kernels: equal to 1e-5 of the logits' range (about 20 here)
    tolerance = 1e-5 * float(expected.max() - expected.min())
    for seq_logits, label, sample in zip(logits, labels, golden["samples"]):
        positions = sample["logit_positions"]  # t with label[t + 1] != -100; the rows, samples concatenated
        assert positions == torch.nonzero(label[1:] != -100).flatten().tolist()
        torch.testing.assert_close(seq_logits[positions], expected[offset:offset + len(positions)],
                                   rtol=1e-5, atol=tolerance)
        offset += len(positions)
    assert offset == expected.shape[0]


@pytest.mark.parametrize("name", EVAL_SETS)
def test_evaluation_ids_greedy_tokens_and_answers(name: str, model, splits, monkeypatch) -> None:
    golden = GOLDEN["model"]["eval"].get(name) or GOLDEN["model"]["eval_text_only"][name]
    ours = [s for s in splits["test"] if s.source == EVAL_SETS[name]]
    collator = Collator(model.tokenizer, 32, STYLE_MEAN, STYLE_STD, 1024, with_answers=False, style=STYLE)
    batch = collator(ours)
    assert [_rows(text, 4) for text in batch.texts] == golden["contexts"]
    generated = []
    real_generate = model.llm.generate

    def recording(*args, **kwargs):
        output = real_generate(*args, **kwargs)
        generated.append(output)
        return output

    monkeypatch.setattr(model.llm, "generate", recording)
    answers = model.generate(batch, max_new_tokens=100, style=STYLE)
    skip = golden["output_prefix_length"]  # transformers 4.30 returns the [bos] it started from
    for ids, expected in zip(generated[0].tolist(), golden["output_ids"]):
        expected = expected[skip:]
        assert ids[:len(expected)] == expected and set(ids[len(expected):]) <= {model.tokenizer.pad_token_id}
    assert answers == golden["answers"]
    if "results" in golden and batch.tasks[0] != "rec":  # REC's results hold parsed boxes (scored elsewhere)
        assert [clean_prediction(a) for a in answers] == [r["answer_pred"] for r in golden["results"]]


@pytest.mark.parametrize("name", [n for n in EVAL_SETS if n not in ("medqa_en", "pubmedqa")])
def test_connector_routing_and_embeddings_of_the_first_image(name: str, model, splits) -> None:
    from safetensors.torch import load_file

    tensors = load_file(GOLDEN_DIR / "golden.safetensors")
    first = next(s for s in splits["test"] if s.source == EVAL_SETS[name])
    pixels = preprocess_images([first.image], 32, STYLE_MEAN, STYLE_STD, width_first=True)
    task = torch.tensor([IMAGE_TASKS.index(first.task)])
    with torch.no_grad():
        vision = model.vision_encoder(pixels)
        embeds, out = model.visual_embeddings(pixels, task)
    torch.testing.assert_close(vision[0], tensors[f"eval/{name}/vision"][1:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeds[0], tensors[f"eval/{name}/image_embeds"], rtol=1e-5, atol=1e-5)
    routing = out.routing.combine_weights().view(1, -1, 5)[0]
    torch.testing.assert_close(routing, tensors[f"eval/{name}/routing"], rtol=1e-5, atol=1e-6)
