"""Block configurations for the triton kernels: a few candidates per shape class, tuned once per class, pinnable.

A *shape class* is (kernel role, dtype, E, N, K, k > 1, tokens rounded up to a power of two): a new token
count in the same power-of-two bucket reuses the tuned choice instead of retuning. Tuning times each
candidate with `triton.testing.do_bench` on the first call of a class (that call synchronises; later calls do
not), so warm up before capturing a CUDA graph.

Pin a configuration instead of tuning, for every role or one:

* ``CMOE_TRITON_CONFIG="block_n=128,block_k=64,num_warps=8,num_stages=3"`` (fields of `KernelConfig`;
  ``block_m`` is chosen from the rows per expert unless given), or `pin_config(...)` in Python;
* ``CMOE_TRITON_AUTOTUNE=0`` — no timing: the first candidate of each class (the heuristic default).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from cmoe.errors import CMoEError

ROLES = ("forward", "backward_input", "weight_grad")


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel launch."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    stage_rows: int = 0  # weight_grad with gathered rows: 1 = load the next block's rows before this block's dot
    tma_weight: int = 0  # forward / backward_input: 1 = load the expert weights through a tensor descriptor
    persistent: int = 0  # forward / backward_input: 1 = ~2 programs per SM, each looping over tiles

    def launch_options(self) -> dict[str, int]:
        """The keyword arguments a triton launch takes from this config."""
        return {"BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "num_warps": self.num_warps,
                "num_stages": self.num_stages}


INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=1)

_pinned: dict[str | None, dict[str, int]] = {}
_tuned: dict[tuple, KernelConfig] = {}
_parsed_env: dict[str, tuple[tuple[str, int], ...]] = {}


def _parse_env() -> dict[str, int]:
    return dict(_parse_config_text(os.environ.get("CMOE_TRITON_CONFIG", "").strip()))


def _parse_config_text(text: str) -> tuple[tuple[str, int], ...]:
    """``CMOE_TRITON_CONFIG``'s value as (field, int) pairs; cached per value, since every kernel launch asks
    (a plain dict: ``torch.compile`` traces through it, where it would warn about an ``lru_cache``)."""
    if not text:
        return ()
    if text in _parsed_env:
        return _parsed_env[text]
    known = {f.name for f in fields(KernelConfig)}
    parsed: dict[str, int] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in known or not value.strip().isdigit():
            raise CMoEError(f"CMOE_TRITON_CONFIG: expected comma-separated name=int with names in {sorted(known)}, "
                            f"got {item!r}")
        parsed[name] = int(value)
    _parsed_env[text] = tuple(parsed.items())
    return _parsed_env[text]


def pin_config(role: str | None = None, **values: int) -> None:
    """Use these `KernelConfig` fields instead of tuning, for `role` (one of `ROLES`) or all roles (None).

    ``pin_config()`` with no values removes the pin for `role`.
    """
    if role is not None and role not in ROLES:
        raise CMoEError(f"pin_config: role must be one of {ROLES} or None, got {role!r}")
    known = {f.name for f in fields(KernelConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CMoEError(f"pin_config: unknown fields {unknown}; known: {sorted(known)}")
    if values:
        _pinned[role] = dict(values)
    else:
        _pinned.pop(role, None)
    _tuned.clear()


def clear_cache() -> None:
    """Forget every tuned choice (the next call of each shape class tunes again)."""
    _tuned.clear()


def autotune_enabled() -> bool:
    return os.environ.get("CMOE_TRITON_AUTOTUNE", "1").strip() not in ("0", "false", "no")


def default_block_m(rows: int, num_experts: int, interpreting: bool) -> int:
    """``BLOCK_M`` of the aligned layout: 128 when experts get many rows each, 64 otherwise (16 interpreted)."""
    pins = {**_parse_env(), **_pinned.get(None, {})}
    if "block_m" in pins:
        return pins["block_m"]
    if interpreting:
        return INTERPRETER_CONFIG.block_m
    return 128 if rows >= 512 * num_experts else 64


def candidates(role: str, block_m: int, element_size: int, gather: bool = False) -> list[KernelConfig]:
    """The configurations tried for `role` (first = the default when tuning is off). A weight gradient over
    gathered rows (`gather`) also tries its two first tiles with the hand-staged gather (``stage_rows=1``); the
    GEMM roles try theirs with the weights loaded through a tensor descriptor (``tma_weight=1``) and with
    persistent tile scheduling (``persistent=1``)."""
    if element_size >= 4:  # fp32 (TF32 or IEEE): half the K tile so the pipeline fits in shared memory
        tiles = [(128, 32, 8, 3), (64, 32, 4, 4), (128, 64, 8, 2), (256, 32, 8, 3)]
    else:
        tiles = [(128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
    if role == "weight_grad":  # an (N, K) tile of dW; the reduction step is BLOCK_M rows
        tiles = ([(128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4)] if element_size < 4
                 else [(128, 64, 8, 3), (64, 64, 4, 4), (128, 128, 8, 2), (64, 128, 4, 3)])
    options = [KernelConfig(block_m, n, k, 8, w, s) for n, k, w, s in tiles]
    if role == "weight_grad" and gather:
        options += [replace(config, stage_rows=1) for config in options[:2]]
    if role != "weight_grad":
        first = options[:2]
        options += [replace(config, tma_weight=1) for config in first]
        options += [replace(config, persistent=1) for config in first]
    return options


def choose(role: str, key: tuple, block_m: int, element_size: int, interpreting: bool,
           bench: Callable[[KernelConfig], float], gather: bool = False) -> KernelConfig:
    """The config for one launch: pinned, interpreter default, cached tuned choice, or tune now with `bench`
    (`gather`: see `candidates`)."""
    pins = {**_parse_env(), **_pinned.get(None, {}), **_pinned.get(role, {})}
    if interpreting:
        return replace(INTERPRETER_CONFIG, block_m=block_m, **{k: v for k, v in pins.items() if k != "block_m"})
    options = candidates(role, block_m, element_size, gather)
    if pins:
        return replace(options[0], block_m=block_m, **{k: v for k, v in pins.items() if k != "block_m"})
    if not autotune_enabled():
        return options[0]
    full_key = (role, block_m, *key)
    if full_key not in _tuned:
        timings = []
        for config in options:
            try:
                timings.append((bench(config), config))
            except Exception:  # a candidate that does not fit this GPU (shared memory, registers) is skipped
                continue
        if not timings:
            raise CMoEError(f"triton backend: no block configuration compiled for {role} {key}; pin one with "
                            "CMOE_TRITON_CONFIG or cmoe.kernels.pin_config")
        _tuned[full_key] = min(timings, key=lambda item: item[0])[1]
    return _tuned[full_key]


def tuned_choices() -> dict[tuple, KernelConfig]:
    """The tuned choices so far (for reports)."""
    return dict(_tuned)
