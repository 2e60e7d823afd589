"""`cmoe.attach` on a tiny random model of every image-text-to-text family of the installed transformers that
has a continuous projector (each model built once), and the support table docs/attach.md made from the results.

Per family: the table's connector is the one a dry run finds; attaching with defaults upcycles the replaced
projection so the logits equal the original model's (the gradient check below shows the connector does move
the loss, so the equality is not vacuous);
``detach`` restores modules, parameters, hooks, config and logits; with ``num_experts=4, top_k=2,
router="task_token", load_balance_coef=0.01`` and one task id per image the loss is the LM loss plus the aux
loss, gradients reach the connector, greedy ``generate`` runs under ``using_task_ids``, and task ids of the wrong
length raise. Regenerate the table with ``CMOE_UPDATE_DOCS=1 pytest tests/plugins/test_attach_families.py``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

import cmoe
from cmoe import CMoEError
from cmoe.plugins.attach_families import FAMILIES, UNSUPPORTED
from cmoe.plugins.attachers import FamilyAttacher, dry_run
from cmoe.plugins.tiny_families import BUILDERS, build

DOCS = Path(__file__).resolve().parents[2] / "docs" / "attach.md"
TASK_OPTIONS = dict(num_experts=4, top_k=2, router="task_token", num_tasks=2, load_balance_coef=0.01)
CHECKS = ("dry run", "upcycled = original", "detach restores", "loss = LM + aux", "grads", "generate",
          "task-id length")
RESULTS: dict[str, dict] = {}


@functools.cache
def tiny(family: str):
    """``(model, inputs, reference logits, connector path found by a dry run)``, or a string saying why
    transformers itself cannot run the family."""
    from transformers import CONFIG_MAPPING, __version__

    if family not in CONFIG_MAPPING:  # an older transformers (the floors stage, .ci/floors)
        return f"not in transformers {__version__}"
    model, inputs = build(family)
    try:
        path, output = dry_run(model, inputs)
    except Exception as error:  # the family's own forward, before cmoe touches anything
        return f"transformers' own forward fails: {type(error).__name__}: {str(error)[:120]}"
    return model, inputs, output.logits, path


def built(family: str):
    found = tiny(family)
    if isinstance(found, str):
        RESULTS.setdefault(family, {})["skipped"] = found
        pytest.skip(found)
    return found


def record(family: str, check: str) -> None:
    RESULTS.setdefault(family, {}).setdefault("passed", set()).add(check)


def snapshot(model: torch.nn.Module) -> dict:
    return dict(
        modules=[(name, type(m).__name__) for name, m in model.named_modules()],
        params={name: p.detach().clone() for name, p in model.named_parameters()},
        hooks=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        config=model.config.to_dict(),
    )


@pytest.mark.smoke
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_upcycled_attach_equals_original_and_detach_restores(family: str) -> None:
    model, inputs, reference, found = built(family)
    attacher = FamilyAttacher(family)
    path = attacher._connector_path(model)
    assert found == path
    record(family, "dry run")
    before = snapshot(model)
    RESULTS[family]["connector"] = path
    RESULTS[family]["replaced"] = attacher.projection(model).description

    connector = cmoe.attach(model)
    assert getattr(model, "_cmoe_attached") == family
    with torch.no_grad():
        out = model(**inputs, task_ids=[0, 1])
    torch.testing.assert_close(out.logits, reference, rtol=1e-4, atol=1e-5)
    assert out.cmoe_aux_loss is not None
    record(family, "upcycled = original")

    assert cmoe.detach(model) is connector
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["hooks"] == before["hooks"]
    assert after["config"] == before["config"]
    assert after["params"].keys() == before["params"].keys()
    assert all(torch.equal(after["params"][k], v) for k, v in before["params"].items())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    record(family, "detach restores")


@pytest.mark.smoke
@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_task_routed_loss_grads_generate(family: str) -> None:
    model, inputs, reference, _ = built(family)
    connector = cmoe.attach(model, **TASK_OPTIONS)
    try:
        out = model(**inputs, task_ids=[0, 1])
        torch.testing.assert_close(out.logits.detach(), reference, rtol=1e-4, atol=1e-5)  # upcycled, task router
        labels = inputs["labels"]
        shift = {"shift_labels": labels} if model.config.is_encoder_decoder else {}  # as Florence-2 computes it
        lm = model.loss_function(logits=out.logits, labels=labels, vocab_size=out.logits.shape[-1], **shift)
        assert torch.isfinite(out.loss) and out.cmoe_aux_loss > 0
        torch.testing.assert_close(out.loss, lm + out.cmoe_aux_loss)
        record(family, "loss = LM + aux")

        out.loss.backward()
        for p in connector.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        assert any(float(p.grad.abs().sum()) > 0 for p in connector.experts.parameters())
        record(family, "grads")

        prompt = {k: v for k, v in inputs.items() if k != "labels"}
        with cmoe.using_task_ids(model, [0, 1]):
            generated = model.generate(**prompt, max_new_tokens=2, do_sample=False)
        expected = 3 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1] + 2
        assert generated.shape[0] == 2 and generated.shape[1] <= expected
        record(family, "generate")

        with pytest.raises(CMoEError, match="task_ids"):
            model(**prompt, task_ids=[0, 1, 1])
        record(family, "task-id length")
    finally:
        cmoe.detach(model)
        model.zero_grad(set_to_none=True)


def render_table() -> str:
    """docs/attach.md from the results of this module's tests."""
    lines = [
        "# Attach anywhere: support table",
        "",
        "Generated by `tests/plugins/test_attach_families.py` (`CMOE_UPDATE_DOCS=1 pytest tests/plugins/test_attach_families.py`)",
        "from tiny random models of every image-text-to-text family in the installed transformers with a",
        "continuous projector. *replaced* is the part of the family's connector that `cmoe.attach` swaps for a",
        "CMoE; everything before it (norms, pixel shuffle, pooling, patch merge, perceiver) is kept. Checks:",
        "the dry run finds the table's connector; upcycled logits equal the original model's; `detach` restores",
        "modules, parameters, hooks, config and logits; with `num_experts=4, top_k=2, router=\"task_token\",",
        "load_balance_coef=0.01` and one task id per image the loss is the LM loss plus the aux loss, gradients",
        "reach the connector, greedy `generate` runs under `using_task_ids`, a wrong task-id length raises.",
        "",
        "| family | connector module | replaced | checks passed |",
        "|---|---|---|---|",
    ]
    passing = 0
    for family in sorted(RESULTS):
        result = RESULTS[family]
        if "skipped" in result:
            lines.append(f"| {family} | `{FAMILIES[family]['connector']}` | — | skipped: {result['skipped']} |")
            continue
        passed = [c for c in CHECKS if c in result.get("passed", set())]
        passing += len(passed) == len(CHECKS)
        status = "all" if len(passed) == len(CHECKS) else ", ".join(passed) or "none"
        lines.append(f"| {family} | `{result.get('connector', '?')}` | {result.get('replaced', '?')} | {status} |")
    lines += ["", f"**{passing} families pass every check.**", "", "Not supported (no continuous projector):", ""]
    lines += [f"- {family}: {reason}" for family, reason in sorted(UNSUPPORTED.items())]
    return "\n".join(lines) + "\n"


def test_support_table_is_current() -> None:
    """Runs after the family tests (same module, defined last); skipped when some of them did not run."""
    if set(RESULTS) != set(BUILDERS) or any("passed" not in r and "skipped" not in r for r in RESULTS.values()):
        pytest.skip("the family tests did not all run in this session")
    table = render_table()
    if os.environ.get("CMOE_UPDATE_DOCS") == "1":
        DOCS.write_text(table)
    assert DOCS.read_text() == table, "docs/attach.md is stale: rerun with CMOE_UPDATE_DOCS=1"
