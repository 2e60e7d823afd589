"""Audit: bad connector and recipe configuration values. Each must raise a `CMoEError` naming the field and
what was expected (types, not truthiness: ``"no"`` is not True), or give the correct value."""

from __future__ import annotations

import json
import math

import pytest
from robustness_audit import assert_clear

from cmoe import CMoEConfig, CMoEConnector, CMoEError, MLPConnector, MLPConnectorConfig, load_connector
from cmoe.reference_models.unimed.config import load_config, parse_overrides

INF, NAN = math.inf, math.nan

CMOE_BAD = [
    ("in_features", 0), ("in_features", -1), ("in_features", 2.5), ("in_features", True), ("in_features", "4"),
    ("in_features", None), ("in_features", NAN),
    ("out_features", 0), ("out_features", "8"), ("out_features", True),
    ("num_experts", 0), ("num_experts", 1.5), ("num_experts", False), ("num_experts", "4"),
    ("top_k", 0), ("top_k", 5), ("top_k", True), ("top_k", 2.0), ("top_k", "2"),
    ("router", "switch"), ("router", 3), ("router", None),
    ("router_input", "image"), ("router_input", 1), ("router_rule", "relu"), ("router_gate", "conv"),
    ("router_hidden", 0), ("router_hidden", 2.5),
    ("router_noise_std", -1.0), ("router_noise_std", INF), ("router_noise_std", NAN), ("router_noise_std", "0.1"),
    ("router_noise_std", True),
    ("renormalize", "no"), ("renormalize", "false"), ("renormalize", "off"), ("renormalize", 0), ("renormalize", 1),
    ("renormalize", None),
    ("router_options", []), ("router_options", "x"), ("router_options", {"bogus": 1}),
    ("expert", "conv"), ("expert", 1), ("expert_hidden", 0), ("expert_hidden", -3), ("expert_hidden", True),
    ("expert_bias", "no"), ("expert_bias", "off"), ("expert_bias", 1),
    ("expert_activation", "swish"), ("expert_activation", 3),
    ("aggregate_tokens", 0), ("aggregate_tokens", True), ("aggregate_tokens", 1.0),
    ("num_tasks", -1), ("num_tasks", True), ("num_tasks", 2.0), ("task_embed_dim", 0),
    ("load_balance_coef", INF), ("load_balance_coef", -INF), ("load_balance_coef", NAN),
    ("load_balance_coef", -1.0), ("load_balance_coef", "0.01"), ("load_balance_coef", True),
    ("z_loss_coef", INF), ("z_loss_coef", NAN), ("z_loss_coef", -0.1), ("z_loss_coef", "x"),
    ("backend", "cuda_magic"), ("backend", 5),
    ("check_finite", "no"), ("check_finite", "false"), ("check_finite", "off"), ("check_finite", 0),
    ("check_finite", None),
]


@pytest.mark.parametrize("field,value", CMOE_BAD, ids=[f"{f}={v!r}" for f, v in CMOE_BAD])
def test_bad_cmoe_config_value_is_refused_naming_the_field(field: str, value: object) -> None:
    kwargs = {"in_features": 4, "out_features": 4, field: value}
    with pytest.raises(CMoEError) as error:
        CMoEConnector(CMoEConfig(**kwargs))
    named = {"expert_activation": "activation"}.get(field, field)
    assert_clear(error.value, named)


MLP_BAD = [("hidden_features", 0), ("bias", "no"), ("aggregate_tokens", 2.0), ("activation", "swish"),
           ("in_features", False)]


@pytest.mark.parametrize("field,value", MLP_BAD, ids=[f"{f}={v!r}" for f, v in MLP_BAD])
def test_bad_mlp_config_value_is_refused(field: str, value: object) -> None:
    with pytest.raises(CMoEError) as error:
        MLPConnector(MLPConnectorConfig(**{"in_features": 4, "out_features": 4, field: value}))
    assert_clear(error.value, field)


CONFIG_JSON = [("a list", "[1, 2]"), ("empty", ""), ("not JSON", "{in_features: 4"), ("null", "null"),
               ("a string", '"cmoe"'), ("binary", "\udcff\udcfe"), ("missing a field", '{"connector_type": "cmoe"}'),
               ("unknown field", '{"connector_type": "cmoe", "in_features": 4, "out_features": 4, "experts": 2}'),
               ("unknown type", '{"connector_type": "rnn", "in_features": 4, "out_features": 4}'),
               ("bool string", '{"connector_type": "cmoe", "in_features": 4, "out_features": 4, "renormalize": "no"}'),
               ("infinite coefficient",
                '{"connector_type": "cmoe", "in_features": 4, "out_features": 4, "z_loss_coef": Infinity}')]


@pytest.mark.parametrize("kind,text", CONFIG_JSON, ids=[k for k, _ in CONFIG_JSON])
def test_bad_config_json_is_refused_naming_the_problem(tmp_path, kind: str, text: str) -> None:
    CMoEConnector(CMoEConfig(4, 4)).save_pretrained(tmp_path)
    (tmp_path / "checksums.json").unlink()  # the user edited the file by hand: checksums no longer apply
    (tmp_path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CMoEError) as error:
        load_connector(tmp_path)
    names = {"a list": ["config.json"], "empty": ["config.json"], "not JSON": ["config.json"],
             "null": ["config.json"], "a string": ["config.json"], "binary": ["config.json"],
             "missing a field": ["in_features"], "unknown field": ["experts"], "unknown type": ["connector_type"],
             "bool string": ["renormalize"], "infinite coefficient": ["z_loss_coef"]}[kind]
    assert_clear(error.value, *names)


RECIPE_BAD = [
    "train.steps=0", "train.steps=-1", "train.steps=ten", "train.steps=2.5", "train.steps=true",
    "train.batch_size=0", "train.batch_size='4'", "train.batch_size=true",
    "train.lr=-1", "train.lr=fast", "train.lr=.inf", "train.lr=.nan", "train.lr=true",
    "train.precision=fp8", "train.precision=16", "train.progress=maybe", "train.progress=1",
    "train.keep_checkpoints=0", "train.distributed=horovod", "train.analyze_every=0", "train.betas='0.9'",
    "train.betas=[0.9, x]", "train.max_grad_norm=big", "train.max_grad_norm=.inf", "train.weight_decay=-0.1",
    "train.save_every=0", "train.log_every=0.5", "train.grad_accum=0", "train.warmup_steps=-5",
    "model.dtype=fp64", "model.image_mean=[0.5]", "model.image_mean=x", "model.aggregation.kind=mean",
    "model.aggregation.rate=0", "model.aggregation.window=-1", "model.tokenizer.kind=bpe",
    "model.lora.enabled=perhaps", "model.lora.enabled=1", "model.lora.r=eight", "model.lora.dropout=x",
    "model.gradient_checkpointing=sometimes", "model.max_text_tokens=many", "model.connector.preset=3",
    "model.connector.options=[]", "model.vision_encoder.name=7",
    "seed=x", "seed=1.5", "output_dir=5", "name=[]", "train.stpes=10", "bogus=1",
    "eval.max_new_tokens=0", "eval.batch_size=0", "eval.limit_per_task=-1", "eval.limit_per_task=x",
    "data.num_workers=-1", "data.train_split=3", "data.sampler_options=[]", "data.ratios=[1]",
]


@pytest.mark.parametrize("override", RECIPE_BAD)
def test_bad_recipe_value_is_refused_naming_the_key(override: str) -> None:
    key = override.split("=")[0]
    leaf = key.split(".")[-1]
    with pytest.raises(CMoEError) as error:
        load_config("tiny", parse_overrides([override]))
    message = assert_clear(error.value)
    assert key in message or (leaf in message and key.split(".")[0] in message), message


BOOL_WORDS = [("no", False), ("false", False), ("off", False), ("OFF", False), ("0", False),
              ("yes", True), ("true", True), ("on", True)]


@pytest.mark.parametrize("word,value", BOOL_WORDS)
def test_boolean_words_in_config_files_mean_what_they_say(word: str, value: bool) -> None:
    # A quoted "no" in YAML (or ${VAR} expanded from the environment) is text: it must read as False, not truthy.
    config = load_config("tiny", {"train": {"progress": word}, "model": {"lora": {"enabled": word}}})
    assert config.train.progress is value and config.model.lora.enabled is value


def test_bool_task_embedding_and_infinite_coefficients_in_a_saved_config_are_refused(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"connector_type": "cmoe", "in_features": 4, "out_features": 4,
                                                      "load_balance_coef": 1e400}))
    with pytest.raises(CMoEError) as error:
        CMoEConfig.from_pretrained(tmp_path)
    assert_clear(error.value, "load_balance_coef")
