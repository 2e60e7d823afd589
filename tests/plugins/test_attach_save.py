"""Save a fine-tuned attached model whole and reload it in a new process (issue 23, item 3).

The model's own ``save_pretrained`` (and HF Trainer's ``save_model``) write base weights, connector and the attach
record; `cmoe.load_attached` rebuilds the model in a fresh interpreter to token-identical greedy output. A plain
``from_pretrained`` of such a folder reports the connector's tensors as unexpected and the projection as missing,
and `cmoe.attach` on what it returns refuses, naming `cmoe.load_attached`; folders that do not match raise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cmoe
from cmoe import CMoEError
from cmoe.plugins.tiny import llava_inputs, qwen2_vl_inputs, tiny_llava, tiny_qwen2_vl

OPTIONS = dict(num_experts=4, top_k=2, router="task_token", num_tasks=3, init_noise=0.5)
FAMILIES = {"llava": (tiny_llava, llava_inputs), "qwen2_vl": (tiny_qwen2_vl, qwen2_vl_inputs)}
TASK_IDS = [2, 0]

RELOAD = """
import json, sys, torch, cmoe
from transformers import LlavaForConditionalGeneration
results = {}
for name, folder in json.loads(sys.argv[1]).items():
    if name == "plain":
        model = LlavaForConditionalGeneration.from_pretrained(folder)
        try:
            cmoe.attach(model)
        except cmoe.CMoEError as error:
            results[name] = str(error)
        continue
    model = cmoe.load_attached(folder).eval()
    inputs = torch.load(folder + "/inputs.pt")
    tokens = model.generate(**inputs, task_ids=TASK_IDS, max_new_tokens=6, do_sample=False)
    dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "connector" in n})
    results[name] = {"tokens": tokens, "dtypes": dtypes, "class": type(model).__name__}
torch.save(results, sys.argv[2])
""".replace("TASK_IDS", repr(TASK_IDS))


def _fine_tune(model: torch.nn.Module, batch: dict) -> None:
    """A few steps on connector and LLM, so the saved weights differ from any initialisation."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        model(**batch, task_ids=TASK_IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _save_llava(folder: Path) -> tuple[str, torch.Tensor]:
    """A fine-tuned LLaVA with token aggregation (attach changes its config's image_seq_length), saved with its
    own save_pretrained."""
    torch.manual_seed(0)
    model = tiny_llava()
    cmoe.attach(model, **OPTIONS, aggregate_tokens=4)
    batch = llava_inputs(model)
    _fine_tune(model, batch)
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    expected = model.eval().generate(**prompt, task_ids=TASK_IDS, max_new_tokens=6, do_sample=False)
    model.save_pretrained(folder)
    torch.save(prompt, folder / "inputs.pt")
    return type(model).__name__, expected


def _save_qwen(folder: Path, dtype: torch.dtype) -> tuple[str, torch.Tensor]:
    """A fine-tuned Qwen2-VL (in `dtype`), saved by HF Trainer's save_model."""
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    model = tiny_qwen2_vl().to(dtype)
    cmoe.attach(model, **OPTIONS)
    batch = qwen2_vl_inputs(model)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    _fine_tune(model, batch)
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    expected = model.eval().generate(**prompt, task_ids=TASK_IDS, max_new_tokens=6, do_sample=False)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(folder.parent / "run"), report_to=[],
                                                          use_cpu=True, save_strategy="no"))
    trainer.save_model(str(folder))
    torch.save(prompt, folder / "inputs.pt")
    return type(model).__name__, expected


@pytest.mark.slow
def test_saved_attached_models_reload_in_a_new_process(tmp_path: Path) -> None:
    """One fresh interpreter reloads a LLaVA saved by save_pretrained and Qwen2-VLs saved by Trainer.save_model
    (float32 and bf16) to token-identical greedy output, and loads a saved LLaVA plainly."""
    saved = {"llava": _save_llava(tmp_path / "llava"), "qwen2_vl": _save_qwen(tmp_path / "qwen", torch.float32),
             "qwen2_vl_bf16": _save_qwen(tmp_path / "qwen_bf16", torch.bfloat16)}
    folders = {"llava": tmp_path / "llava", "qwen2_vl": tmp_path / "qwen", "qwen2_vl_bf16": tmp_path / "qwen_bf16",
               "plain": tmp_path / "llava"}
    done = subprocess.run([sys.executable, "-c", RELOAD, json.dumps({k: str(v) for k, v in folders.items()}),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "out.pt")
    for name, (cls, expected) in saved.items():
        dtype = "torch.bfloat16" if name.endswith("bf16") else "torch.float32"
        assert results[name]["class"] == cls and results[name]["dtypes"] == [dtype], name
        assert torch.equal(results[name]["tokens"], expected), name

    # Only the plain load printed a load report: the connector's tensors unexpected, the projection missing.
    assert done.stderr.count("LOAD REPORT") == 1
    report = done.stderr[done.stderr.index("LOAD REPORT"):]
    assert "connector" in report and "UNEXPECTED" in report and "MISSING" in report
    assert results["plain"].startswith("model: its config records a cmoe connector")
    assert "load the folder with cmoe.load_attached(path)" in results["plain"]
    record = json.loads((tmp_path / "llava" / "config.json").read_text())["cmoe_attach"]
    assert record["attacher"] == "llava" and record["connector"]["num_experts"] == 4
    assert record["config_fields"] == {"image_seq_length": 16}


def test_folders_that_cannot_be_reloaded_whole_raise_one_clear_error(tmp_path: Path) -> None:
    plain = tiny_llava()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(CMoEError, match="expected a model saved with a cmoe connector attached.*cmoe.attach"):
        cmoe.load_attached(tmp_path / "plain")
    with pytest.raises(CMoEError, match="no config.json here"):
        cmoe.load_attached(tmp_path)

    four, two = tiny_llava(), tiny_llava()
    cmoe.attach(four, **OPTIONS)
    cmoe.attach(two, **dict(OPTIONS, num_experts=2))
    four.save_pretrained(tmp_path / "four")
    two.save_pretrained(tmp_path / "two")
    (tmp_path / "four" / "model.safetensors").replace(tmp_path / "mixed.safetensors")
    (tmp_path / "two" / "model.safetensors").replace(tmp_path / "four" / "model.safetensors")
    with pytest.raises(CMoEError, match="the saved tensors do not match a LlavaForConditionalGeneration with the "
                                        "recorded connector"):
        cmoe.load_attached(tmp_path / "four")

    qwen = tiny_qwen2_vl()
    cmoe.attach(qwen, **OPTIONS)
    qwen.save_pretrained(tmp_path / "qwen")
    from transformers import LlavaForConditionalGeneration

    with pytest.raises(CMoEError, match="model_class: expected a class for the saved Qwen2VLConfig.*got "
                                        "LlavaForConditionalGeneration, which takes a LlavaConfig"):
        cmoe.load_attached(tmp_path / "qwen", model_class=LlavaForConditionalGeneration)


def test_detach_after_load_attached_says_the_projection_was_not_saved(tmp_path: Path) -> None:
    model = tiny_llava()
    cmoe.attach(model, **OPTIONS)
    model.save_pretrained(tmp_path)
    reloaded = cmoe.load_attached(tmp_path)
    with pytest.raises(CMoEError, match="the projection the connector replaced is not saved with it"):
        cmoe.detach(reloaded)
    assert cmoe.attached_model(reloaded) is reloaded  # still attached and usable after the refusal
