"""The shipped plugins and a real third-party plugin distribution, found through entry points."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import pytest
import torch

import cmoe
from cmoe import CMoEConfig, CMoEConnector, CMoEError
from cmoe.plugins.tiny import tiny_llama_config

pytestmark = pytest.mark.smoke  # in the newest-versions stage (.ci/latest)

EXAMPLE = "cmoe-example-router"


def test_example_plugin_distribution_is_installed() -> None:
    try:
        importlib.metadata.distribution(EXAMPLE)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{EXAMPLE} is not installed; `make test` installs it (pip install ./plugins/examples/{EXAMPLE})")


def test_example_router_is_discovered_and_trains_by_name() -> None:
    assert cmoe.ROUTERS.origin("lsh_hash") == f"example_router ({EXAMPLE} 0.1.0)"
    torch.manual_seed(0)
    model = CMoEConnector(CMoEConfig(in_features=8, out_features=4, num_experts=4, router="lsh_hash"))
    x, y = torch.randn(32, 4, 8), torch.randn(32, 4, 4)
    out = model(x)
    assert out.routing.expert_index.shape == (128, 1) and len(out.routing.tokens_per_expert().nonzero()) > 1
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x).hidden_states, y)
        first = first if first is not None else loss.item()
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert loss.item() < 0.9 * first


def test_cli_lists_plugins_with_their_distribution() -> None:
    done = subprocess.run([sys.executable, "-m", "cmoe", "plugins", "list"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [line.split() for line in done.stdout.splitlines()]
    assert ["router", "lsh_hash", "example_router", f"({EXAMPLE}", "0.1.0)"] in lines
    assert ["router", "token_topk", "cmoe", "(built-in)"] in lines
    assert ["attacher", "llava", "builtin_plugins", "(cmoe", f"{cmoe.__version__})"] in lines
    assert {"vision", "llm", "backend", "expert"} <= {line[0] for line in lines}


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}),                                                  # LLaMA-2 shape
    ("llama", {"num_key_value_heads": 2, "rope_theta": 500000.0}),  # LLaMA-3 shape: GQA, long rope
    ("qwen2", {}),
    ("mistral", {}),
    ("phi3", {}),
    ("phi", {}),
])
def test_llm_plugin_takes_connector_embeddings(model_type: str, extra: dict) -> None:
    torch.manual_seed(0)
    options = tiny_llama_config(model_type=model_type, **extra)
    llm = cmoe.get_llm("hf_causal_lm")(config=options)
    assert llm.hidden_size == 64
    connector = CMoEConnector(CMoEConfig(in_features=16, out_features=llm.hidden_size, aggregate_tokens=2))
    visual = connector(torch.randn(2, 8, 16)).hidden_states
    text = llm.embed(torch.randint(3, 900, (2, 5)))
    embeds = torch.cat([visual, text], dim=1)
    labels = torch.cat([torch.full((2, 4), -100), torch.randint(3, 900, (2, 5))], dim=1)
    out = llm(inputs_embeds=embeds, labels=labels)
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 9, 1000)
    out.loss.backward()
    assert connector.experts.weights[0].grad.abs().sum() > 0
    generated = llm.generate(inputs_embeds=embeds.detach(), max_new_tokens=2, do_sample=False)
    assert generated.shape[0] == 2


def test_llm_plugin_lora_trains_adapters_only() -> None:
    llm = cmoe.get_llm("hf_causal_lm")(config=tiny_llama_config(), lora={"r": 4})
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("down_proj" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)


def test_lora_on_attached_llava_keeps_connector_trainable_and_vision_untouched() -> None:
    from cmoe.plugins.llms import apply_lora
    from cmoe.plugins.tiny import llava_inputs, tiny_llava

    model = tiny_llava()
    connector = cmoe.attach(model, num_experts=2, aggregate_tokens=4)
    model = apply_lora(model, r=4, only_under="language_model", trainable=("multi_modal_projector",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in connector.parameters()} <= {id(p) for p in model.parameters() if p.requires_grad}
    assert all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert any("language_model" in n and "lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    out = model(**llava_inputs(model.base_model.model))
    out.loss.backward()
    assert connector.experts.weights[0].grad is not None


def test_llm_plugin_errors() -> None:
    build = cmoe.get_llm("hf_causal_lm")
    with pytest.raises(CMoEError, match="expected exactly one of path"):
        build()
    with pytest.raises(CMoEError, match="expected a local checkpoint directory, got '/nope'.*nothing is downloaded"):
        build(path="/nope")
    with pytest.raises(CMoEError, match="expected a 'model_type' key"):
        build(config={"hidden_size": 8})
    llm = build(config=tiny_llama_config())
    with pytest.raises(CMoEError, match="inputs_embeds: expected width 64.*set the connector's out_features to 64"):
        llm(inputs_embeds=torch.randn(1, 3, 32))


def test_llm_plugin_round_trips_a_local_checkpoint(tmp_path) -> None:
    llm = cmoe.get_llm("hf_causal_lm")(config=tiny_llama_config())
    llm.model.save_pretrained(tmp_path)
    again = cmoe.get_llm("hf_causal_lm")(path=str(tmp_path))
    ids = torch.randint(3, 900, (1, 6))
    torch.testing.assert_close(again(inputs_embeds=again.embed(ids)).logits, llm(inputs_embeds=llm.embed(ids)).logits)
