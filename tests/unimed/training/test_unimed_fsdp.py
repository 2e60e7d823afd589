"""FSDP2 (``train.distributed: fsdp``) on two CPU processes (gloo): the sharded tiny model trains like an unsharded
one fed both ranks' batches (allclose in fp32), both ranks gather the same full state, and that state, in the DDP
checkpoint format, resumes into a fresh sharded model that then trains identically. The sharded model comes from
`build_sharded_model`: rank 1 builds it on the meta device and receives its shards from rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmoe.errors import CMoEError


def _run_worker(out: Path, *args: str) -> None:
    worker = Path(__file__).resolve().parents[2] / "support" / "unimed_fsdp_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMOE_DISABLE_PLUGINS": os.environ.get("CMOE_DISABLE_PLUGINS", "")}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker), str(out), *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 0.0,
                 atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def _load(out: Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(out / f"{name}.safetensors")), json.loads((out / f"{name}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "checkpointing"])
def test_fsdp_matches_unsharded_training_and_resumes(tmp_path: Path, mode: str) -> None:
    _run_worker(tmp_path, mode)
    reports = [json.loads((tmp_path / f"report_rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["world"] == 2 and reports[0]["kinds"] == ["DTensor", "Parameter"]
    assert reports[0]["generated"] == reports[0]["reference_generated"] == reports[1]["generated"]

    # build_sharded_model: rank 1 built everything on the meta device (never the full LLM), allocated only its
    # shards, and ended with rank 0's values everywhere, non-persistent buffers (RoPE, position ids) included.
    assert reports[0]["meta_at_sharding"] == {"llm": [False], "vision_encoder": [False], "connector": [False]}
    assert reports[1]["meta_at_sharding"] == {"llm": [True], "vision_encoder": [True], "connector": [True]}
    shards = [reports[r]["local_shards"] for r in (0, 1)]
    assert all(shard["expected"] for shard in shards)
    assert shards[0]["full"] == shards[1]["full"] == shards[0]["local"] + shards[1]["local"]
    assert 0.4 < shards[1]["local"] / shards[1]["full"] < 0.6
    initial = [load_file(str(tmp_path / f"initial_rank{r}.safetensors")) for r in (0, 1)]
    initial_reference = load_file(str(tmp_path / "initial_reference.safetensors"))
    assert any(".inv_freq" in name for name in initial_reference)
    assert any("position_ids" in name for name in initial_reference)
    _assert_same(initial[0], initial_reference)
    _assert_same(initial[1], initial_reference)
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"] == reports[0]["reference_fingerprint"]
    assert reports[0]["prepare_error"] == "checkpoint: the frozen weights differ (raised on purpose)"
    assert "rank 0 failed" in reports[1]["prepare_error"] and "raised on purpose" in reports[1]["prepare_error"]

    full = [load_file(str(tmp_path / f"full_rank{r}.safetensors")) for r in (0, 1)]
    reference = load_file(str(tmp_path / "reference.safetensors"))
    assert list(full[0]) == list(reference)
    assert any(name.startswith("connector.") for name in reference) and any("lora_" in name for name in reference)
    _assert_same(full[0], full[1])
    # Adam turns float noise in near-zero gradient coordinates into update differences of a few 1e-6.
    _assert_same(full[0], reference, rtol=1e-4, atol=1e-5)
    assert reports[0]["norms"] == reports[1]["norms"]
    torch.testing.assert_close(reports[0]["norms"], reports[0]["reference_norms"], rtol=1e-5, atol=0)

    optimizer, meta = _load(tmp_path, "optimizer_rank0")
    reference_optimizer, reference_meta = _load(tmp_path, "reference_optimizer")
    assert meta == reference_meta
    # Moments of near-zero gradient coordinates differ by float noise (~1e-9 with the pretrained tiny LLM).
    _assert_same(optimizer, reference_optimizer, rtol=1e-3, atol=1e-8)
    other, other_meta = _load(tmp_path, "optimizer_rank1")
    assert other_meta == meta
    _assert_same(optimizer, other)

    for r in (0, 1):
        assert reports[r]["rank0_only_matches"] is (r == 0) and reports[r]["rank0_only_empty"] is (r == 1)
        assert reports[r]["overflow_skipped"] and reports[r]["scale"] == [32.0, 32.0]
    saved = load_file(str(tmp_path / "step1" / "trainable.safetensors"))
    step1_optimizer, _ = _load(tmp_path / "step1", "optimizer")
    with_state = {key.split(".")[0] for key in step1_optimizer}
    lora = sum(not name.startswith("connector.") for name in saved)
    assert len(with_state) == lora < len(saved)
    assert reports[0]["resumed_state_params"] == lora
    for r in (0, 1):
        _assert_same(load_file(str(tmp_path / f"restored_rank{r}.safetensors")), full[0])
        restored_optimizer, restored_meta = _load(tmp_path, f"restored_optimizer_rank{r}")
        assert restored_meta == meta
        _assert_same(restored_optimizer, optimizer)


def test_shard_model_needs_a_process_group() -> None:
    from cmoe.reference_models.unimed.training.distributed import shard_model

    with pytest.raises(CMoEError, match="torchrun"):
        shard_model(torch.nn.Linear(2, 2), torch.device("cpu"))  # type: ignore[arg-type]
