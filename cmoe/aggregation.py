"""Token aggregation: concatenate ``n`` consecutive visual tokens into one wider token.

Uni-Med and MiniGPT-v2 turn 256 EVA-CLIP tokens of width 1408 into 64 tokens of width 5632 this way
(a plain reshape of consecutive tokens, i.e. 1×n strips of the patch grid), cutting the LLM's sequence.
"""

from __future__ import annotations

import torch
from einops import rearrange

from cmoe.errors import expect


def aggregate_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, N, D] → [B, N/n, n·D]`` by concatenating each run of ``n`` consecutive tokens."""
    expect(isinstance(n, int) and n >= 1, "aggregate_tokens", "an int >= 1", n)
    expect(x.dim() == 3, "x", "a [batch, tokens, features] tensor", lambda: f"shape {tuple(x.shape)}")
    if n == 1:
        return x
    expect(x.shape[1] % n == 0, "x", lambda: f"a token count divisible by aggregate_tokens={n} "
           f"(pad or crop the sequence, or choose a divisor of {x.shape[1]})", lambda: f"{x.shape[1]} tokens")
    return rearrange(x, "b (m n) d -> b m (n d)", n=n)


POOL_MODES = ("avg", "max")


def pool_tokens(x: torch.Tensor, window: int, mode: str = "avg") -> torch.Tensor:
    """``[B, S·S, D] → [B, (S/w)², D]``: average or max pooling over ``window × window`` cells of the square
    patch grid (Uni-Med's alternatives to the 1×4 reshape; the width stays D)."""
    expect(mode in POOL_MODES, "mode", f"one of {POOL_MODES}", repr(mode))
    expect(isinstance(window, int) and window >= 1, "window", "an int >= 1", window)
    expect(x.dim() == 3, "x", "a [batch, tokens, features] tensor", lambda: f"shape {tuple(x.shape)}")
    side = int(round(x.shape[1] ** 0.5))
    expect(side * side == x.shape[1] and side % window == 0, "x",
           f"a square patch grid whose side is divisible by window={window}", lambda: f"{x.shape[1]} tokens")
    grid = rearrange(x, "b (h w) d -> b d h w", h=side)
    pool = torch.nn.functional.avg_pool2d if mode == "avg" else torch.nn.functional.max_pool2d
    return rearrange(pool(grid, window), "b d h w -> b (h w) d")
