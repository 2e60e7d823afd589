"""The attached connector follows the model's dtype and device (issue 23, item 4): in a bf16 or fp16 model it is
built in that dtype, its upcycled logits equal the original model's within that dtype's rounding, and it trains."""

from __future__ import annotations

import pytest
import torch

import cmoe
from cmoe.plugins.tiny import llava_inputs, qwen2_vl_inputs, tiny_llava, tiny_qwen2_vl

FAMILIES = {"llava": (tiny_llava, llava_inputs), "qwen2_vl": (tiny_qwen2_vl, qwen2_vl_inputs)}


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_connector_takes_the_models_dtype_and_keeps_its_logits(family: str, dtype: torch.dtype) -> None:
    build, make_inputs = FAMILIES[family]
    model = build().to(dtype).eval()
    inputs = cast(make_inputs(model), dtype)
    with torch.no_grad():
        reference = model(**inputs).logits
    connector = cmoe.attach(model, num_experts=4, top_k=2, router="task_token", num_tasks=2)
    assert {p.dtype for p in connector.parameters()} == {dtype}
    with torch.no_grad():
        out = model(**inputs, task_ids=[0, 1])
    assert out.logits.dtype == dtype
    eps = torch.finfo(dtype).eps  # mixing k upcycled experts rounds a few times in this dtype
    torch.testing.assert_close(out.logits, reference, rtol=4 * eps, atol=4 * eps * float(reference.abs().max()))

    model.train()
    out = model(**inputs, task_ids=[1, 0])
    out.loss.backward()
    grads = [p.grad for p in connector.parameters() if p.grad is not None]
    assert grads and all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    cmoe.detach(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)


def test_a_float32_model_keeps_a_float32_connector() -> None:
    model = tiny_llava()
    connector = cmoe.attach(model, num_experts=2)
    assert {p.dtype for p in connector.parameters()} == {torch.float32}
    cmoe.detach(model)
