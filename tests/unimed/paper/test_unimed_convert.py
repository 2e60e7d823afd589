"""``cmoe unimed convert-original``: checkpoints written in the original Uni-Med's exact layout (by a test
helper, tiny widths) convert into a `CMoEConnector` whose outputs equal the original's routing rule on the same
weights, and into a recipe checkpoint that ``cmoe unimed eval`` and ``analyze`` run on; bad files give one clear
error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmoe.connector import CMoEConnector, load_connector
from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.cli import main
from cmoe.reference_models.unimed.model.collate import IMAGE_TASKS
from cmoe.reference_models.unimed.config import load_config, parse_overrides
from cmoe.reference_models.unimed.paper.convert import convert_original_checkpoint
from cmoe.reference_models.unimed.evaluation.evaluate import load_trained_model
from cmoe.reference_models.unimed.model.assembly import connector_config
from cmoe.reference_models.unimed.data.splits import load_split
from cmoe.reference_models.unimed.model.tokenizer import build_word_tokenizer
from cmoe.reference_models.unimed.training.train import prompt_texts

from unimed_original_ref import (RECIPE_NAME, TASKS, lora_state, original_forward, original_state,
                                 write_original_checkpoint)

WIDTH, RATE, HIDDEN, TASK_WIDTH = 8, 4, 12, 20


def _check_against_reference(connector: CMoEConnector, state: dict, router_type: str, method: str, topk: int) -> None:
    for task in TASKS:
        x = torch.randn(2, 3 * RATE, WIDTH)
        ours = connector(x, torch.full((2,), IMAGE_TASKS.index(RECIPE_NAME[task]))).hidden_states
        reference = original_forward(state, x.reshape(2, 3, WIDTH * RATE), task, router_type, method, topk)
        torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("router_type,method,topk,layers", [
    ("soft", "router_task_token", 2, 2),
    ("sparse", "router_task_token", 2, 2),
    ("sparse", "router_task_token", 1, 2),
    ("hard", "router_task_token", 2, 2),
    ("constant", "router_task_token", 2, 2),
    ("soft", "router_token", 2, 2),
    ("sparse", "router_task", 2, 2),
    ("soft", "router_task_token", 2, 1),
])
def test_converted_connector_equals_the_original_rule(tmp_path: Path, router_type: str, method: str, topk: int,
                                                      layers: int) -> None:
    router_in = {"router_task_token": WIDTH * RATE + TASK_WIDTH, "router_token": WIDTH * RATE,
                 "router_task": TASK_WIDTH}[method]
    state = original_state(WIDTH * RATE, HIDDEN, TASK_WIDTH, expert_layers=layers, router_in=router_in)
    path = write_original_checkpoint(tmp_path / "checkpoint_0.pth", state, {
        "router_type": router_type, "router_method": method, "num_experts": 5, "sparse_topk": topk,
        "resample_rate": RATE, "resample_method": "projection", "task_token_c": TASK_WIDTH,
        "projector_type": "moe_mlp" if layers == 2 else "moe_linear"})
    result = convert_original_checkpoint(path, tmp_path / "out")
    assert result.variant.router_type == router_type and result.lora_tensors == 0
    connector = load_connector(result.connector_dir)
    assert connector.config.in_features == WIDTH and connector.config.aggregate_tokens == RATE
    _check_against_reference(connector, state, router_type, method, topk)
    recipe = load_config("tiny", parse_overrides(result.overrides))  # the flags it prints rebuild the same connector
    rebuilt = connector_config(recipe.model.connector.preset, WIDTH, HIDDEN, recipe.model.aggregation.rate,
                               recipe.model.connector.options)
    assert rebuilt.to_dict() == connector.config.to_dict()
    if router_type in ("hard", "constant"):  # the original builds a router it never uses: read, then dropped
        assert "router.fc1.weight" in result.dropped_keys and "task_tokens.vqa" in result.dropped_keys
    assert any(key.startswith("llm_proj.") for key in result.dropped_keys)


def test_detection_without_a_stored_config_needs_the_router_type(tmp_path: Path) -> None:
    state = original_state(WIDTH * RATE, HIDDEN, TASK_WIDTH)
    path = write_original_checkpoint(tmp_path / "checkpoint_0.pth", state, None)
    with pytest.raises(CMoEError, match="router_type: the checkpoint stores no config.*--router-type"):
        convert_original_checkpoint(path, tmp_path / "a")
    result = convert_original_checkpoint(path, tmp_path / "b", router_type="soft")  # method from the widths
    assert result.variant.router_input == "task_token"
    _check_against_reference(load_connector(result.connector_dir), state, "soft", "router_task_token", 2)
    same = original_state(WIDTH * RATE, HIDDEN, WIDTH * RATE, router_in=WIDTH * RATE)  # token and task alike
    path = write_original_checkpoint(tmp_path / "checkpoint_1.pth", same, None)
    with pytest.raises(CMoEError, match=r"router_method: the router's input width 32 fits \['router_token', "
                                        r"'router_task'\].*--router-method"):
        convert_original_checkpoint(path, tmp_path / "c", router_type="soft")


def test_unknown_and_missing_keys_are_listed_in_one_error(tmp_path: Path) -> None:
    state = original_state(WIDTH * RATE, HIDDEN, TASK_WIDTH)
    state["query_tokens"] = torch.zeros(1, 32, 8)
    del state["moe_layers.3.2.bias"], state["llm_proj.3.2.bias"], state["task_tokens.cls"]
    path = write_original_checkpoint(tmp_path / "checkpoint_0.pth", state, {"router_type": "soft"})
    with pytest.raises(CMoEError, match=r"unknown \['query_tokens'\], missing \['moe_layers.3.2.bias', "
                                        r"'task_tokens.cls'\]"):
        convert_original_checkpoint(path, tmp_path / "out")
    state = original_state(WIDTH * RATE, HIDDEN, TASK_WIDTH)
    state["llm_proj.0.0.bias"] = state["llm_proj.0.0.bias"] + 1
    path = write_original_checkpoint(tmp_path / "checkpoint_1.pth", state, {"router_type": "soft"})
    with pytest.raises(CMoEError, match="llm_proj.0.0.bias differs from its moe_layers twin"):
        convert_original_checkpoint(path, tmp_path / "out")


class NotATensor:
    pass


def test_checkpoints_are_read_without_unpickling_code(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_0.pth"
    torch.save({"model": original_state(WIDTH * RATE, HIDDEN, TASK_WIDTH), "config": NotATensor()}, path)
    with pytest.raises(CMoEError, match=r"could not be read with torch.load\(weights_only=True\)"):
        convert_original_checkpoint(path, tmp_path / "out")
    with pytest.raises(CMoEError, match="expected an original Uni-Med checkpoint file"):
        convert_original_checkpoint(tmp_path / "missing.pth", tmp_path / "out")


SMALL = ["--set", "data.synthetic.num_images=24", "--set", "data.synthetic.qa_questions=8",
         "--set", "data.synthetic.eval_images=6", "--set", "eval.max_new_tokens=4", "--set", "train.batch_size=2"]


@pytest.mark.slow
def test_converted_checkpoint_runs_eval_and_analyze_through_the_command_line(tmp_path: Path, capsys) -> None:
    """At the tiny recipe's widths (CLIP 32 → 128-wide tokens, LLaMA 64, 2 layers), LoRA r 8 included."""
    token, llm = 32 * RATE, 64
    state = {**original_state(token, llm, token), **lora_state(layers=2, width=llm, intermediate=128, r=8)}
    path = write_original_checkpoint(tmp_path / "checkpoint_0.pth", state, {
        "router_type": "sparse", "router_method": "router_task_token", "num_experts": 5, "sparse_topk": 2,
        "resample_rate": RATE, "task_token_c": token, "lora_r": 8, "lora_alpha": 16})
    base = load_config("tiny", parse_overrides(SMALL[1::2]))
    tokenizer_dir = tmp_path / "tokenizer"
    build_word_tokenizer(prompt_texts(load_split(base.data, "train"))).save_pretrained(str(tokenizer_dir))
    out = tmp_path / "converted"
    assert main(["convert-original", str(path), str(out), "--tokenizer", str(tokenizer_dir)]) == 0
    printed = capsys.readouterr().out
    assert "preset 'original_sparse'" in printed and "28 LoRA tensors" in printed
    flags = printed.split("--checkpoint ")[1].split(" ", 1)[1].split()
    assert "model.connector.preset=original_sparse" in flags and "model.lora.r=8" in flags
    state_json = json.loads((out / "state.json").read_text())
    assert state_json["step"] == 50000 and state_json["original_epoch"] == 0

    config = load_config("tiny", parse_overrides([*SMALL[1::2], *flags[1::2]]))
    model, step = load_trained_model(config, out)
    assert step == 50000
    params = dict(model.named_parameters())
    q_a = "llm.model.base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"
    assert torch.equal(params[q_a], state[q_a.replace("llm.model.", "llm_model.", 1)])
    torch.testing.assert_close(params["connector.router.task_embedding.weight"][IMAGE_TASKS.index("report")],
                               state["task_tokens.caption"][0, 0])

    common = ["--config", "tiny", "--output-dir", str(tmp_path / "run"), "--checkpoint", str(out), *SMALL, *flags]
    assert main(["eval", *common, "--out", str(tmp_path / "eval"), "--limit-per-task", "1"]) == 0
    assert set(json.loads((tmp_path / "eval" / "eval.json").read_text())) >= {"vqa", "report", "rec", "cls"}
    assert main(["analyze", *common, "--out", str(tmp_path / "tow"), "--batches-per-task", "1"]) == 0
    assert (tmp_path / "tow" / "tug_of_war.json").is_file()
