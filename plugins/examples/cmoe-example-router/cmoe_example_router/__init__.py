"""A third-party cmoe plugin: ``lsh_hash``, a parameter-free router that sends each token to one expert by
random-hyperplane hashing of its features (similar tokens share an expert; no gate to learn or balance)."""

from __future__ import annotations

import torch
from torch import nn

import cmoe


class LSHHashRouter(nn.Module):
    """Token → ``argmax(x · P)`` for a fixed random projection ``P [in, E]``; weight 1 (top-1)."""

    def __init__(self, in_features: int, num_experts: int, *, top_k: int | None = None, seed: int = 0,
                 **_: object):
        super().__init__()
        if top_k not in (None, 1):
            raise cmoe.CMoEError(f"top_k: expected None or 1 for router 'lsh_hash', got {top_k}")
        self.num_experts, self.top_k = num_experts, 1
        planes = torch.randn(in_features, num_experts, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("planes", planes)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> cmoe.RoutingResult:
        logits = x.reshape(-1, x.shape[-1]) @ self.planes.to(x.dtype)
        index = logits.argmax(-1, keepdim=True)
        probs = nn.functional.one_hot(index[:, 0], self.num_experts).to(x.dtype)
        return cmoe.RoutingResult(index, torch.ones(index.shape, dtype=x.dtype, device=x.device), probs, logits)


@cmoe.hookimpl
def cmoe_register_routers(register) -> None:
    register("lsh_hash", LSHHashRouter)
