"""Routers: decide, for every token, which experts project it and with what weight.

Every router maps tokens ``x [B, N, D]`` (and task ids ``[B]`` where it needs them) to one `RoutingResult`
over the ``T = B·N`` flattened tokens. A learned router is three independent choices:

* its **input**: the token (``token``), a learned task embedding (``task``), or both concatenated
  (``task_token``, Uni-Med's default);
* its **rule** turning logits into probabilities: ``softmax`` or Uni-Med's ``sigmoid`` (sigmoid, then
  normalised to sum 1);
* its **gate**: a linear layer (light, the default) or an MLP (Uni-Med uses hidden = 4 × input);

plus ``top_k`` (``None`` = dense: every expert weighted, as Uni-Med's soft router). With ``renormalize``
the k chosen weights are rescaled to sum 1; ``topk_weights`` names the convention at ``k = 1``:

* ``"switch"`` (the default): rescale for ``k > 1`` only. At ``k = 1`` rescaling would fix the weight at 1
  and cut the router off from the gradient, so the weight stays the probability (as in Switch Transformer).
* ``"renormalized"``: rescale at every k. With the softmax rule this is a softmax over the k selected logits,
  Uni-Med's sparse router, so at ``k = 1`` the weight is exactly 1.

The built-in names are presets of these choices; ``hard_task`` and ``constant`` are Uni-Med's two fixed
(parameter-free) routers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cmoe.errors import CMoEError, expect, expect_ids_below

INPUTS = ("token", "task", "task_token")
RULES = ("softmax", "sigmoid")
GATES = ("linear", "mlp")
FP16_WARN_ABOVE = 1024.0
TOPK_WEIGHTS = ("switch", "renormalized")


@dataclass
class RoutingResult:
    """What a router decided for ``T`` tokens and ``E`` experts.

    ``expert_index`` [T, k] (long) and ``expert_weight`` [T, k] name each token's k experts and their mixing
    weights; ``router_probs`` [T, E] (rows sum to 1) and ``router_logits`` [T, E] are the full distribution;
    ``aux_losses`` holds the weighted auxiliary terms (already multiplied by their coefficients) whose sum
    is added to the training loss.
    """

    expert_index: torch.Tensor
    expert_weight: torch.Tensor
    router_probs: torch.Tensor
    router_logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        return self.router_probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.expert_index.shape[-1]

    def combine_weights(self) -> torch.Tensor:
        """Mixing weights as a dense ``[T, E]`` matrix (zero where an expert is not chosen)."""
        dense = self.expert_weight.new_zeros(self.expert_weight.shape[0], self.num_experts)
        return dense.scatter_add(1, self.expert_index, self.expert_weight)

    def tokens_per_expert(self) -> torch.Tensor:
        """How many (token, slot) assignments each expert received, ``[E]`` (long)."""
        return expert_counts(self.expert_index, self.num_experts)


def expert_counts(expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, ``[E]`` (long). A scatter-add, not ``torch.bincount``, which syncs with the
    host on CUDA (to size its output) and so would break CUDA-graph capture of a training step."""
    flat = expert_index.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's balance loss ``E · Σ_e f_e · P_e``.

    ``f_e`` is the fraction of the ``T·k`` assignments that went to expert e (not differentiable), ``P_e``
    the mean router probability of e. Equals 1 under perfectly uniform routing.
    """
    num_experts = probs.shape[-1]
    counts = expert_counts(expert_index, num_experts).to(probs.dtype)
    fraction = counts / expert_index.numel()
    return num_experts * torch.sum(fraction * probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss ``mean_t (logsumexp_e logits[t, e])²``: keeps logits small and stable."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean().to(logits.dtype)


def _resolve_top_k(top_k: int | None, num_experts: int) -> int:
    k = num_experts if top_k is None else top_k
    expect(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= num_experts, "top_k",
           f"an int in 1..num_experts={num_experts} (or None for dense routing)", repr(top_k))
    return k


def _check_task_ids(task_ids: torch.Tensor | None, batch: int, num_tasks: int, router: str,
                    device: torch.device | None = None) -> torch.Tensor:
    if task_ids is None:
        raise CMoEError(f"task_ids: router {router!r} needs one task id per sample, shape [{batch}] (long), "
                        "got None; pass task_ids=... to the connector")
    if not isinstance(task_ids, torch.Tensor):
        task_ids = torch.as_tensor(task_ids)
    expect(task_ids.shape == (batch,) and not task_ids.is_floating_point() and not task_ids.is_complex()
           and task_ids.dtype != torch.bool, "task_ids",
           lambda: f"an integer tensor of shape [{batch}] (one task id per sample)",
           lambda: f"{task_ids.dtype} of shape {list(task_ids.shape)}")
    if device is not None and task_ids.device != device:
        expect(task_ids.device.type == "cpu", "task_ids", f"a tensor on the device of x ({device}) or on the CPU",
               f"a tensor on {task_ids.device}; move it with task_ids.to(x.device)")
        task_ids = task_ids.to(device)
    if task_ids.device.type == "cpu":
        expect_ids_below(task_ids, num_tasks, "task_ids", f"values in 0..{num_tasks - 1} (num_tasks={num_tasks})")
    return task_ids.long()


def _check_tokens(x: torch.Tensor, weight: torch.Tensor) -> None:
    """Tokens a router can route: real data (not meta), at least one token, the gate's dtype unless autocast
    runs (a mismatch would fail deep in a matmul)."""
    expect(x.device.type != "meta", "x", "a tensor with data (not on the meta device)",
           "a meta tensor; materialise it (e.g. model.to_empty(device=...) and load weights) first")
    expect(x.shape[0] > 0 and x.shape[1] > 0, "x", "at least one sample and one token",
           lambda: f"shape {list(x.shape)}; skip the connector for an empty batch")
    if not torch.is_autocast_enabled(x.device.type) and weight.device.type != "meta":
        expect(x.dtype == weight.dtype, "x", f"dtype {weight.dtype} (the router's weights)",
               lambda: f"{x.dtype}; cast with x.to({weight.dtype}) or connector.to({x.dtype}), or run under "
                       "torch.autocast")


def _warn_fp16_range(x: torch.Tensor, logits: torch.Tensor) -> None:
    """Warn when fp16 routing runs near the fp16 range: its outputs may be finite while the backward overflows."""
    largest = max(float(x.detach().abs().max()), float(logits.detach().abs().max()))
    if largest > FP16_WARN_ABOVE:
        warnings.warn(f"router: fp16 inputs or logits reach {largest:.3g} (fp16 max 65504): gradients may overflow "
                      "to inf/NaN; normalise the features, use bf16 or fp32, or a GradScaler", RuntimeWarning,
                      stacklevel=3)


class Router(nn.Module):
    """A learned router: input (token / task / task_token) → gate → rule → optional top-k.

    Subclasses set the class defaults (`default_input`, `default_rule`, `default_top_k`); every option can be
    overridden per instance. ``in_features`` is the width of the tokens the router sees.
    """

    name: ClassVar[str] = "router"
    default_input: ClassVar[str] = "token"
    default_rule: ClassVar[str] = "softmax"
    default_top_k: ClassVar[int | None] = None

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        top_k: int | None = None,
        num_tasks: int = 0,
        input: str | None = None,
        rule: str | None = None,
        gate: str = "linear",
        gate_hidden: int | None = None,
        task_embed_dim: int | None = None,
        renormalize: bool = True,
        topk_weights: str = "switch",
        noise_std: float = 0.0,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        check_finite: bool = True,
    ):
        super().__init__()
        expect(isinstance(in_features, int) and in_features >= 1, "in_features", "an int >= 1", in_features)
        expect(isinstance(num_experts, int) and num_experts >= 1, "num_experts", "an int >= 1", num_experts)
        self.in_features, self.num_experts = in_features, num_experts
        self.input = self.default_input if input is None else input
        self.rule = self.default_rule if rule is None else rule
        expect(self.input in INPUTS, "router_input", f"one of {INPUTS}", repr(self.input))
        expect(self.rule in RULES, "router_rule", f"one of {RULES}", repr(self.rule))
        expect(gate in GATES, "router_gate", f"one of {GATES}", repr(gate))
        default_k = None if self.default_top_k is None else min(self.default_top_k, num_experts)
        self.top_k = _resolve_top_k(default_k if top_k is None else top_k, num_experts)
        self.num_tasks = num_tasks
        self.renormalize = renormalize
        expect(topk_weights in TOPK_WEIGHTS, "topk_weights", f"one of {TOPK_WEIGHTS}", repr(topk_weights))
        self.topk_weights = topk_weights
        self.noise_std = float(noise_std)
        self.load_balance_coef, self.z_loss_coef = float(load_balance_coef), float(z_loss_coef)
        self.check_finite = check_finite

        gate_in = 0
        if self.input in ("task", "task_token"):
            expect(isinstance(num_tasks, int) and num_tasks >= 1, "num_tasks",
                   f"an int >= 1 for router input {self.input!r}", num_tasks)
            self.task_embed_dim = in_features if task_embed_dim is None else task_embed_dim
            self.task_embedding = nn.Embedding(num_tasks, self.task_embed_dim)
            nn.init.normal_(self.task_embedding.weight, std=0.02)
            gate_in += self.task_embed_dim
        if self.input in ("token", "task_token"):
            gate_in += in_features
        if gate == "linear":
            self.gate = nn.Linear(gate_in, num_experts)
        else:
            hidden = 4 * gate_in if gate_hidden is None else gate_hidden
            self.gate = nn.Sequential(nn.Linear(gate_in, hidden), nn.GELU(), nn.Linear(hidden, num_experts))
        self.gate_kind = gate

    def _validate(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor | None:
        expect(x.dim() == 3 and x.shape[-1] == self.in_features, "x",
               f"a [batch, tokens, {self.in_features}] tensor", lambda: f"shape {list(x.shape)}")
        expect(x.is_floating_point(), "x", "a floating-point tensor", x.dtype)
        _check_tokens(x, next(self.gate.parameters()))
        if self.input == "token":
            return None
        return _check_task_ids(task_ids, x.shape[0], self.num_tasks, self.name, x.device)

    def compute_logits(self, x: torch.Tensor, task_ids: torch.Tensor | None) -> torch.Tensor:
        """Gate logits ``[B·N, E]`` for tokens ``x [B, N, D]``."""
        batch, tokens, _ = x.shape
        if self.input == "token":
            return self.gate(x.reshape(batch * tokens, -1))
        task = self.task_embedding(task_ids).to(x.dtype)
        if self.input == "task":
            per_sample = self.gate(task)
            return per_sample[:, None, :].expand(batch, tokens, -1).reshape(batch * tokens, -1)
        joint = torch.cat([task[:, None, :].expand(batch, tokens, -1), x], dim=-1)
        return self.gate(joint.reshape(batch * tokens, -1))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rule == "softmax":
            return torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        # sigmoid(l) / Σ sigmoid(l) computed as softmax(logsigmoid(l)): the same value, but finite where every
        # sigmoid of a token underflows to 0 (all logits below about -104 in fp32), where the quotient is 0/0.
        return torch.softmax(F.logsigmoid(logits.float()), dim=-1).to(logits.dtype)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> RoutingResult:
        task_ids = self._validate(x, task_ids)
        logits = self.compute_logits(x, task_ids)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        # The checks read values back (a host sync), so a compiled graph skips them, as it does the id range check.
        if self.check_finite and not torch.compiler.is_compiling():
            if not bool(torch.isfinite(logits).all()):
                raise CMoEError("router_logits: expected finite values, got NaN or inf; check the input features "
                                "for NaN/inf, lower the learning rate, or add z_loss_coef to keep logits small")
            if logits.dtype == torch.float16:
                _warn_fp16_range(x, logits)
        probs = self.probabilities(logits)
        if self.top_k == self.num_experts:
            weight = probs
            index = torch.arange(self.num_experts, device=x.device).expand(probs.shape[0], -1)
        else:
            weight, index = torch.topk(probs, self.top_k, dim=-1)
            if self.renormalize and (self.top_k > 1 or self.topk_weights == "renormalized"):
                weight = weight / weight.sum(dim=-1, keepdim=True)
        aux: dict[str, torch.Tensor] = {}
        if self.load_balance_coef > 0:
            aux["load_balance"] = self.load_balance_coef * load_balancing_loss(probs, index)
        if self.z_loss_coef > 0:
            aux["z_loss"] = self.z_loss_coef * router_z_loss(logits)
        return RoutingResult(index, weight, probs, logits, aux)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"input={self.input}, rule={self.rule}, gate={self.gate_kind}")


class TokenTopKRouter(Router):
    """Gate over each token → softmax → top-k (k = 2 unless set), renormalised: the classic sparse MoE router."""

    name = "token_topk"
    default_input = "token"
    default_rule = "softmax"
    default_top_k = 2


class SoftRouter(Router):
    """Uni-Med's soft rule: dense weights ``sigmoid(logits)`` normalised to sum 1, over the token."""

    name = "soft"
    default_input = "token"
    default_rule = "sigmoid"


class TaskRouter(Router):
    """Gate over a learned task embedding only: every token of a sample gets the same weights."""

    name = "task"
    default_input = "task"
    default_rule = "sigmoid"


class TaskTokenRouter(Router):
    """Gate over ``[task embedding ; token]`` with Uni-Med's sigmoid rule: the original's default router."""

    name = "task_token"
    default_input = "task_token"
    default_rule = "sigmoid"


class FixedRouter(nn.Module):
    """A parameter-free router; its logits are ``log(probs)`` (clamped finite) so ``softmax(logits) ≈ probs``."""

    name: ClassVar[str] = "fixed"

    def __init__(self, in_features: int, num_experts: int, *, top_k: int | None = None, num_tasks: int = 0,
                 gate: str = "linear", **_: object):
        super().__init__()
        expect(isinstance(num_experts, int) and num_experts >= 1, "num_experts", "an int >= 1", num_experts)
        expect(gate == "linear", "router_gate", f"the default for router {self.name!r}, which has no gate",
               repr(gate))
        self.in_features, self.num_experts, self.num_tasks = in_features, num_experts, num_tasks
        self.top_k = _resolve_top_k(top_k, num_experts)

    def _result(self, probs: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> RoutingResult:
        logits = probs.clamp_min(1e-30).log().clamp_min(-1e4)
        return RoutingResult(index, weight, probs, logits, {})


class HardTaskRouter(FixedRouter):
    """Uni-Med's hard router: every token of task t goes to one expert with weight 1.

    ``task_experts[t]`` names that expert (Uni-Med maps its tasks by position in its own task list, see
    ``cmoe.reference_models.unimed.original``); every index must be below ``num_experts``, as the original
    fails when there are fewer experts than tasks. Without ``task_experts`` the documented default is
    ``t mod E``: with fewer experts than tasks, several tasks share an expert.
    """

    name = "hard_task"

    def __init__(self, in_features: int, num_experts: int, *, top_k: int | None = None, num_tasks: int = 0,
                 task_experts: list[int] | tuple[int, ...] | None = None, **options: object):
        expect(top_k in (None, 1), "top_k", f"None or 1 for router {self.name!r} (one expert per task)", top_k)
        expect(isinstance(num_tasks, int) and num_tasks >= 1, "num_tasks", "an int >= 1 for router 'hard_task'",
               num_tasks)
        super().__init__(in_features, num_experts, top_k=1, num_tasks=num_tasks, **options)
        if task_experts is None:
            task_experts = [t % num_experts for t in range(num_tasks)]
        expect(isinstance(task_experts, (list, tuple)) and len(task_experts) == num_tasks
               and all(isinstance(e, int) and not isinstance(e, bool) for e in task_experts),
               "task_experts", f"a list of {num_tasks} expert indices (one per task)", repr(task_experts))
        too_big = [e for e in task_experts if not 0 <= e < num_experts]
        if too_big:
            raise CMoEError(f"task_experts: expected expert indices in 0..{num_experts - 1} (num_experts="
                            f"{num_experts}), got {too_big} in {list(task_experts)}; use at least "
                            f"{max(task_experts) + 1} experts or map the tasks onto the existing ones")
        self.task_experts = tuple(task_experts)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> RoutingResult:
        expect(x.dim() == 3, "x", "a [batch, tokens, features] tensor", lambda: f"shape {list(x.shape)}")
        batch, tokens, _ = x.shape
        task_ids = _check_task_ids(task_ids, batch, self.num_tasks, self.name, x.device)
        experts = torch.tensor(self.task_experts, dtype=torch.long, device=x.device)
        index = experts[task_ids][:, None].expand(batch, tokens).reshape(-1, 1)
        probs = F.one_hot(index[:, 0], self.num_experts).to(x.dtype)
        return self._result(probs, index, torch.ones(index.shape, dtype=x.dtype, device=x.device))


class ConstantRouter(FixedRouter):
    """Uni-Med's constant router: every expert gets weight 1/E for every token."""

    name = "constant"

    def __init__(self, in_features: int, num_experts: int, *, top_k: int | None = None, **options: object):
        expect(top_k in (None, num_experts), "top_k",
               f"None or num_experts={num_experts} for router 'constant' (it weights every expert)", top_k)
        super().__init__(in_features, num_experts, top_k=None, **options)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> RoutingResult:
        expect(x.dim() == 3, "x", "a [batch, tokens, features] tensor", lambda: f"shape {list(x.shape)}")
        count = x.shape[0] * x.shape[1]
        probs = x.new_full((count, self.num_experts), 1.0 / self.num_experts)
        index = torch.arange(self.num_experts, device=x.device).expand(count, -1)
        return self._result(probs, index, probs)
