"""Block-configuration choice for the triton kernels (pure Python: no triton, no GPU)."""

from __future__ import annotations

import pytest

from cmoe.errors import CMoEError
from cmoe.kernels import tuning


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CMOE_TRITON_CONFIG", raising=False)
    monkeypatch.delenv("CMOE_TRITON_AUTOTUNE", raising=False)
    tuning._pinned.clear()
    tuning.clear_cache()
    yield
    tuning._pinned.clear()
    tuning.clear_cache()


def _timed(times: dict[int, float], calls: list) -> callable:
    def bench(config: tuning.KernelConfig) -> float:
        calls.append(config)
        return times.get(config.block_n, 1.0)
    return bench


def test_tunes_once_per_shape_class_and_keeps_the_fastest() -> None:
    calls: list = []
    bench = _timed({256: 0.5}, calls)
    first = tuning.choose("forward", ("bf16", 8, 4096, 5632), 128, 2, False, bench)
    again = tuning.choose("forward", ("bf16", 8, 4096, 5632), 128, 2, False, bench)
    assert first == again and first.block_n == 256 and first.block_m == 128
    assert len(calls) == len(tuning.candidates("forward", 128, 2))  # the second call did not time anything
    tuning.choose("forward", ("bf16", 8, 2048, 1408), 128, 2, False, bench)
    assert len(calls) == 2 * len(tuning.candidates("forward", 128, 2))


def test_a_candidate_that_fails_is_skipped_and_none_left_is_an_error() -> None:
    def bench(config: tuning.KernelConfig) -> float:
        if config.block_n == 128:
            raise RuntimeError("out of shared memory")
        return float(config.block_n)
    assert tuning.choose("forward", ("k",), 64, 2, False, bench).block_n == 64

    def broken(config: tuning.KernelConfig) -> float:
        raise RuntimeError("no")
    with pytest.raises(CMoEError, match="no block configuration compiled .* pin one with CMOE_TRITON_CONFIG"):
        tuning.choose("weight_grad", ("k",), 64, 2, False, broken)


def test_pins_from_env_and_python_override_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setenv("CMOE_TRITON_CONFIG", "block_n=32,num_warps=2,block_m=32")
    config = tuning.choose("forward", ("k",), 32, 2, False, _timed({}, calls))
    assert (config.block_n, config.num_warps, config.block_m) == (32, 2, 32) and not calls
    assert tuning.default_block_m(10**6, 8, interpreting=False) == 32
    tuning.pin_config("forward", num_stages=5)
    assert tuning.choose("forward", ("k",), 32, 2, False, _timed({}, calls)).num_stages == 5
    tuning.pin_config("forward")  # removes the pin
    assert tuning.choose("forward", ("k",), 32, 2, False, _timed({}, calls)).num_stages != 5


def test_autotune_off_takes_the_first_candidate_without_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMOE_TRITON_AUTOTUNE", "0")
    calls: list = []
    assert tuning.choose("forward", ("k",), 128, 4, False, _timed({}, calls)) == tuning.candidates("forward", 128, 4)[0]
    assert not calls


def test_bad_pins_say_what_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMOE_TRITON_CONFIG", "block_n=abc")
    with pytest.raises(CMoEError, match="CMOE_TRITON_CONFIG: expected comma-separated name=int"):
        tuning.choose("forward", ("k",), 64, 2, False, _timed({}, []))
    with pytest.raises(CMoEError, match="pin_config: unknown fields \\['blockn'\\]"):
        tuning.pin_config(blockn=3)
    with pytest.raises(CMoEError, match="role must be one of"):
        tuning.pin_config("sideways", block_n=3)


def test_block_m_follows_rows_per_expert() -> None:
    assert tuning.default_block_m(8 * 512, 8, interpreting=False) == 128
    assert tuning.default_block_m(8 * 511, 8, interpreting=False) == 64
    assert tuning.default_block_m(10**6, 8, interpreting=True) == tuning.INTERPRETER_CONFIG.block_m


def test_the_gathered_weight_gradient_also_tries_the_staged_gather() -> None:
    plain = tuning.candidates("weight_grad", 128, 2)
    gathered = tuning.candidates("weight_grad", 128, 2, gather=True)
    assert all(c.stage_rows == 0 for c in plain) and gathered[:len(plain)] == plain
    staged = gathered[len(plain):]
    assert [c.stage_rows for c in staged] == [1, 1]
    assert [(c.block_n, c.block_k) for c in staged] == [(c.block_n, c.block_k) for c in plain[:2]]
    assert all(c.stage_rows == 0 for c in tuning.candidates("forward", 128, 2, gather=True))
    assert all(c.tma_weight == 0 for c in gathered)

    calls: list = []
    chosen = tuning.choose("weight_grad", ("k",), 128, 2, False,
                           lambda config: calls.append(config) or (0.5 if config.stage_rows else 1.0), gather=True)
    assert chosen.stage_rows == 1 and len(calls) == len(gathered)


def test_the_gemm_roles_also_try_tensor_descriptors_and_persistent_scheduling() -> None:
    for role in ("forward", "backward_input"):
        options = tuning.candidates(role, 128, 2)
        plain = [c for c in options if not c.tma_weight and not c.persistent]
        assert options[:len(plain)] == plain and len(options) == len(plain) + 4
        variants = options[len(plain):]
        assert [(c.tma_weight, c.persistent) for c in variants] == [(1, 0), (1, 0), (0, 1), (0, 1)]
        assert [(c.block_n, c.block_k) for c in variants] == [(c.block_n, c.block_k) for c in plain[:2]] * 2
    assert not any(c.persistent for c in tuning.candidates("weight_grad", 128, 2, gather=True))
