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
    expect(x.dim() == 3, "x", "a [batch, tokens, features] tensor", f"shape {tuple(x.shape)}")
    if n == 1:
        return x
    expect(x.shape[1] % n == 0, "x", f"a token count divisible by aggregate_tokens={n} "
           f"(pad or crop the sequence, or choose a divisor of {x.shape[1]})", f"{x.shape[1]} tokens")
    return rearrange(x, "b (m n) d -> b m (n d)", n=n)
