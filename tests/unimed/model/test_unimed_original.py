"""The ``original*`` connector presets against a hand-written reference of the original Uni-Med's routing
rule (soft, sparse top-k at k = 2 and k = 1, hard by the original's task order, constant), forward and
backward; the Switch convention by name; fewer experts than tasks; the connector's fp16 autocast; and every
preset building and training for a step through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmoe.connector import build_connector
from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.cli import main
from cmoe.reference_models.unimed.model.collate import IMAGE_TASKS
from cmoe.reference_models.unimed.config import load_config
from cmoe.reference_models.unimed.model.assembly import CONNECTOR_PRESETS, connector_config

from unimed_original_ref import RECIPE_NAME, TASKS, original_forward

WIDTH, RATE, OUT = 8, 4, 12  # vision width 8, 1×4 strips → 32-wide tokens, LLM width 12


def original_layout(connector) -> dict[str, torch.Tensor]:
    """Our connector's weights under the original's state-dict names (the inverse of the conversion)."""
    w: dict[str, torch.Tensor] = {}
    layers = connector.experts.layers
    for e in range(connector.config.num_experts):
        for (weight, bias), index in zip(layers, (0, 2)):
            w[f"moe_layers.{e}.{index}.weight"], w[f"moe_layers.{e}.{index}.bias"] = weight[e], bias[e]
    router = connector.router
    if hasattr(router, "gate"):
        w["router.fc1.weight"], w["router.fc1.bias"] = router.gate[0].weight, router.gate[0].bias
        w["router.fc2.weight"], w["router.fc2.bias"] = router.gate[2].weight, router.gate[2].bias
    for task in TASKS:
        row = IMAGE_TASKS.index(RECIPE_NAME[task])
        w[f"task_tokens.{task}"] = (router.task_embedding.weight[row][None, None] if hasattr(router, "task_embedding")
                                    else torch.zeros(1, 1, WIDTH * RATE))
    return w


@pytest.mark.parametrize("preset,options,router_type,topk", [
    ("original", {}, "soft", 2),
    ("original_sparse", {}, "sparse", 2),
    ("original_sparse", {"top_k": 1}, "sparse", 1),
    ("original_sparse", {"top_k": 3}, "sparse", 3),
    ("original_hard", {}, "hard", 2),
    ("original_constant", {}, "constant", 2),
])
def test_original_presets_match_the_original_routing_rule(preset: str, options: dict, router_type: str,
                                                          topk: int) -> None:
    torch.manual_seed(3)
    connector = build_connector(connector_config(preset, WIDTH, OUT, RATE, options))
    weights = original_layout(connector)
    for task in TASKS:
        x = torch.randn(3, 6 * RATE, WIDTH, requires_grad=True)
        task_ids = torch.full((3,), IMAGE_TASKS.index(RECIPE_NAME[task]))
        ours = connector(x, task_ids).hidden_states
        reference = original_forward(weights, x.reshape(3, 6, WIDTH * RATE), task, router_type, sparse_topk=topk)
        torch.testing.assert_close(ours, reference)
        probe = torch.randn_like(ours)
        grads = torch.autograd.grad((ours * probe).sum(), [x, *connector.parameters()], allow_unused=True)
        ref_grads = torch.autograd.grad((reference * probe).sum(), [x, *connector.parameters()], allow_unused=True)
        for got, want in zip(grads, ref_grads):
            if want is None:  # a weight the original never uses in this setting (e.g. another task's token)
                assert got is None or not got.any()
            else:
                torch.testing.assert_close(got, want)


def test_sparse_top1_weight_is_one_and_the_switch_convention_stays_available_by_name() -> None:
    torch.manual_seed(0)
    x, tasks = torch.randn(2, 4 * RATE, WIDTH), torch.tensor([0, 3])
    original = build_connector(connector_config("original_sparse", WIDTH, OUT, RATE, {"top_k": 1}))
    assert torch.equal(original(x, tasks).routing.expert_weight, torch.ones(8, 1))
    switch = build_connector(connector_config("original_sparse", WIDTH, OUT, RATE,
                                              {"top_k": 1, "router_options": {"topk_weights": "switch"}}))
    switch.load_state_dict(original.state_dict())
    routing = switch(x, tasks).routing
    assert (routing.expert_weight < 1).all()
    torch.testing.assert_close(routing.expert_weight, routing.router_probs.max(-1, keepdim=True).values)
    with pytest.raises(CMoEError, match=r"topk_weights: expected one of \('switch', 'renormalized'\)"):
        build_connector(connector_config("original_sparse", WIDTH, OUT, RATE, {"router_options": {"topk_weights": "x"}}))


def test_hard_routing_follows_the_original_task_order_and_refuses_too_few_experts() -> None:
    connector = build_connector(connector_config("original_hard", WIDTH, OUT, RATE))
    index = connector(torch.randn(5, RATE, WIDTH), torch.arange(5)).routing.expert_index[:, 0]
    # recipe order vqa, report, rec, reg, cls → the original's positions of vqa, caption, refer, identify, cls
    assert index.tolist() == [TASKS.index(RECIPE_NAME_INV) for RECIPE_NAME_INV in ("vqa", "caption", "refer",
                                                                                   "identify", "cls")] == [0, 3, 1, 2, 4]
    with pytest.raises(CMoEError, match=r"task_experts: expected expert indices in 0..2 \(num_experts=3\), got "
                                        r"\[3, 4\] in \[0, 3, 1, 2, 4\]; use at least 5 experts"):
        build_connector(connector_config("original_hard", WIDTH, OUT, RATE, {"num_experts": 3}))
    with pytest.raises(CMoEError, match="router_gate: expected the default for router 'hard_task'"):
        build_connector(connector_config("original_hard", WIDTH, OUT, RATE, {"router_gate": "mlp"}))


def test_connector_autocast_runs_the_connector_in_half_precision(tmp_path: Path) -> None:
    from cmoe.reference_models.unimed.model.assembly import build_model
    from cmoe.reference_models.unimed.model.tokenizer import build_word_tokenizer

    assert load_config("paper").model.connector_autocast == "float16"
    config = load_config("tiny", {"model": {"connector_autocast": "float16", "lora": {"enabled": False}}})
    model = build_model(config.model, build_word_tokenizer(["a b c"]))
    pixels = torch.randn(2, 3, 32, 32)
    hidden, out = model.visual_embeddings(pixels, torch.tensor([0, 1]))
    assert out.routing.router_logits.dtype == torch.float16  # the gate's matmuls ran in half precision
    assert next(model.connector.parameters()).dtype == torch.float32  # the weights stay float32
    model.connector_autocast = None
    full, full_out = model.visual_embeddings(pixels, torch.tensor([0, 1]))
    assert full_out.routing.router_logits.dtype == torch.float32
    assert not torch.equal(hidden, full)
    torch.testing.assert_close(hidden.float(), full, atol=2e-2, rtol=2e-2)
    with pytest.raises(CMoEError, match="model.connector_autocast: expected null"):
        load_config("tiny", {"model": {"connector_autocast": "fp8"}})


SMALL = ["--set", "data.synthetic.num_images=24", "--set", "data.synthetic.qa_questions=8",
         "--set", "data.synthetic.eval_images=6", "--set", "train.steps=1", "--set", "train.batch_size=2",
         "--set", "train.warmup_steps=0", "--set", "train.progress=false", "--set", "train.log_every=1"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(CONNECTOR_PRESETS))
def test_every_preset_builds_and_trains_a_step_through_the_command_line(preset: str, tmp_path: Path,
                                                                        capsys) -> None:
    code = main(["train", "--config", "tiny", "--output-dir", str(tmp_path), "--set",
                 f"model.connector.preset={preset}", *SMALL])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "trained to step 1" in printed.out
    assert printed.out.index("memory estimate per device:") < printed.out.index("trained to step 1")
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 1 and record["loss"] > 0
    saved = json.loads((tmp_path / "step_00000001" / "state.json").read_text())
    assert saved["config"]["model"]["connector"]["preset"] == preset
