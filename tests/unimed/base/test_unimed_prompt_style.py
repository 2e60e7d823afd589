"""Prompt styles (``prompts.style``: ``original`` | ``cmoe``) in a run: pool templates drawn per read and keyed so a
resumed run repeats the straight one bit for bit, the record in checkpoints and eval tables, and bad settings.
The text itself is checked against the original's code in test_unimed_original_run.py."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.cli import main
from cmoe.reference_models.unimed.config import load_config
from cmoe.reference_models.unimed.data.sample import Sample
from cmoe.reference_models.unimed.evaluation.evaluate import run_evaluation
from cmoe.reference_models.unimed.instructions import POOLS, DrawnInstructions, draw_template, keyed_batches
from cmoe.reference_models.unimed.model.checkpoint import read_checkpoint
from cmoe.reference_models.unimed.prompt_style import PROMPT_STYLES, resolve_style
from cmoe.reference_models.unimed.model.collate import sample_prompt
from cmoe.reference_models.unimed.training.train import Trainer

from unimed_tiny import test_config as tiny_config


def test_draws_are_uniform_keyed_and_fresh_at_every_read() -> None:
    counts = Counter(draw_template(42, batch, position, 7) for batch in range(700) for position in range(4))
    assert set(counts) == set(range(7)) and max(counts.values()) < 1.3 * min(counts.values())
    assert draw_template(42, 3, 1, 7) == draw_template(42, 3, 1, 7)
    # the same sample read again (another batch) draws afresh, as random.choice at every __getitem__ does
    assert len({draw_template(42, batch, 0, 7) for batch in range(20)}) > 3
    assert [draw_template(1, 0, p, 7) for p in range(8)] != [draw_template(2, 0, p, 7) for p in range(8)]


def test_keys_are_global_so_any_number_of_processes_draws_the_same() -> None:
    stream = [[i, i + 1] for i in range(0, 24, 2)]
    single = [key for batch in keyed_batches(stream, 0, 1) for key in batch]
    ranks = [key for rank in range(3) for batch in keyed_batches(stream[rank::3], rank, 3) for key in batch]
    assert sorted(single) == sorted(ranks)
    samples = [Sample("vqa", {"question": f"q{i}"}, "yes", image=torch.zeros(4, 4).numpy(), source="slake_vqa")
               for i in range(24)]
    drawn = DrawnInstructions(samples, seed=5, draw=True)
    templates = {key: drawn[key].meta["template"] for key in single}
    assert set(templates.values()) == {0, 1} and samples[0].meta == {}  # the loaded sample is not changed
    assert all(DrawnInstructions(samples, 5, draw=False)[key] is samples[key[0]] for key in single)


def test_original_words_against_ours() -> None:
    vqa = Sample("vqa", {"question": "is it big?"}, "yes", image=torch.zeros(4, 4).numpy(), source="pathvqa",
                 meta={"template": 0})
    original, ours = PROMPT_STYLES["original"], PROMPT_STYLES["cmoe"]
    assert sample_prompt(vqa, original, training=True).prompt == \
        "[INST] <Img><ImageHere></Img> [vqa] is it big?  [/INST]"
    assert sample_prompt(vqa, ours, training=True).prompt == \
        "[INST] <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short answer: " \
        "is it big? [/INST]"
    assert sample_prompt(vqa, original, training=False).prompt == sample_prompt(vqa, ours, training=False).prompt
    report = Sample("report", {"question": "Describe this input image."}, "a b", image=torch.zeros(4, 4).numpy(),
                    source="medpix", meta={"template": 9})
    assert sample_prompt(report, original, training=True).prompt.endswith(
        "[caption] What can you infer from this photograph?  [/INST]")
    assert sample_prompt(report, original, training=False).prompt.endswith("input image.  [/INST]")
    pubmed = Sample("qa", {"question": "Does  it\nwork? " + "w " * 60}, "yes", source="pubmedqa",
                    meta={"instruction_words": 50})
    asked = sample_prompt(pubmed, original, training=False).prompt
    assert asked.startswith("[INST] [qa] If you are a doctor, please answer the following question using 'yes'")
    assert len(asked.removeprefix("[INST] ").removesuffix(" [/INST]").split(" ")) == 50 and "it\nwork?" in asked


def test_unknown_style_point_or_value_names_the_known(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CMoEError, match="unknown prompt style 'paper'; known prompt styles: cmoe, original"):
        load_config("tiny", {"prompts": {"style": "paper"}})
    with pytest.raises(CMoEError, match=r"prompts.eval_bos: expected one of 2, 1 .*got 3"):
        resolve_style("original", {"eval_bos": 3})
    with pytest.raises(CMoEError, match="unknown prompts setting 'bos'"):
        resolve_style("cmoe", {"bos": 2})
    assert main(["train", "--config", "tiny", "--set", "prompts.style=paper", "--out", str(tmp_path)]) == 2
    assert "known prompt styles: cmoe, original" in capsys.readouterr().err
    assert resolve_style("cmoe", {"eval_bos": 2}).style == "cmoe+custom"
    assert resolve_style("original", {"eval_bos": 2}).style == "original"


@pytest.mark.slow
def test_a_resumed_run_with_pool_templates_repeats_the_straight_run(tmp_path: Path) -> None:
    """Style ``original`` on the tiny set (its word-level tokenizer stays as loaded): 8 straight steps against 4 +
    4 resumed; pool templates are drawn at every read, and the record names the style in both places."""
    run = dict(train__steps=8, train__save_every=4, prompts__style="original")
    straight = Trainer(tiny_config(tmp_path / "straight", **run)).train()
    split = tmp_path / "split"
    Trainer(tiny_config(split, **run)).train(steps=4)
    resumed = Trainer(tiny_config(split, **run)).train()
    a, b = read_checkpoint(straight.checkpoint), read_checkpoint(resumed.checkpoint)
    assert all(torch.equal(a["trainable"][k], b["trainable"][k]) for k in a["trainable"])
    assert [r["loss"] for r in straight.history[-1:]] == [json.loads(line)["loss"] for line in
                                                          (split / "metrics.jsonl").read_text().splitlines()[-1:]]
    record = a["state"]["original_run"]
    assert record["prompts"] == "original" and record["templates"] == "pools"
    assert record["tokenizer"] == "as_loaded"  # the tiny tokenizer is word-level: no SentencePiece model
    trainer = Trainer(tiny_config(tmp_path / "peek", **run))
    trainer.setup()
    batches = list(islice(trainer._batches(), 4))
    drawn = [s.meta.get("template") for batch in batches for s in batch.samples if s.task in ("vqa", "rec", "reg")]
    assert len(set(drawn) - {None}) >= 2, drawn
    ours = Trainer(tiny_config(tmp_path / "ours", train__steps=8, train__save_every=4)).train()
    assert not all(torch.equal(a["trainable"][k], read_checkpoint(ours.checkpoint)["trainable"][k])
                   for k in a["trainable"])
    evaluated = run_evaluation(tiny_config(split, **run))
    table = (evaluated.path / "eval.md").read_text()
    assert "Run: prompts: original (templates=pools, space_before_inst=True, eval_bos=2" in table
    assert json.loads((evaluated.path / "eval.json").read_text())["original_run"]["eval_bos"] == 2
    assert POOLS["slake_vqa"].templates[0] == "[vqa] {}"
