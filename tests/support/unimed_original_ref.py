"""A hand-written reference of the original Uni-Med connector (``encode_img`` of tsinghua-msiip/Uni-Med's
``uni_med/models/uni_med.py``, after token aggregation) and a writer of checkpoints in its exact layout.

Written from the original's rules, independently of cmoe: the weights are the original's state-dict entries
(``task_tokens.<task>`` [1, 1, C], ``moe_layers.<e>.{0,2}.*``, ``router.fc1/fc2.*``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TASKS = ["vqa", "refer", "identify", "caption", "cls"]
RECIPE_NAME = {"vqa": "vqa", "refer": "rec", "identify": "reg", "caption": "report", "cls": "cls"}
LORA_MODULES = {"self_attn": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def original_forward(w: dict[str, torch.Tensor], image_embeds: torch.Tensor, task: str, router_type: str,
                     router_method: str = "router_task_token", sparse_topk: int = 2) -> torch.Tensor:
    """The original's connector on aggregated tokens ``[bs, n, D]`` of one task (one task per batch)."""
    bs, n, _ = image_embeds.shape
    num_experts = len({k.split(".")[1] for k in w if k.startswith("moe_layers.")})
    task_tokens_embeds = w[f"task_tokens.{task}"].repeat(bs, n, 1)
    mix_embeds = torch.cat([w[f"task_tokens.{task}"].repeat(bs, n, 1), image_embeds], dim=2)

    def router(x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(F.linear(x, w["router.fc1.weight"], w["router.fc1.bias"]))
        return F.linear(hidden, w["router.fc2.weight"], w["router.fc2.bias"])

    source = {"router_task_token": mix_embeds, "router_token": image_embeds,
              "router_task": task_tokens_embeds}[router_method]
    if router_type == "soft":
        routing_weights = router(source).sigmoid()
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    elif router_type == "hard":
        routing_weights = torch.zeros(bs, n, num_experts)
        routing_weights[:, :, TASKS.index(task)] = 1.0
    elif router_type == "constant":
        routing_weights = torch.ones(bs, n, num_experts) / num_experts
    else:
        logits = router(source)
        top_k_logits, indices = logits.topk(sparse_topk, dim=-1)
        sparse_logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, top_k_logits)
        routing_weights = F.softmax(sparse_logits, dim=-1)
    outputs = []
    for e in range(num_experts):
        x = F.linear(image_embeds, w[f"moe_layers.{e}.0.weight"], w[f"moe_layers.{e}.0.bias"])
        if f"moe_layers.{e}.2.weight" in w:
            x = F.linear(F.gelu(x), w[f"moe_layers.{e}.2.weight"], w[f"moe_layers.{e}.2.bias"])
        outputs.append(x * routing_weights[:, :, e][:, :, None])
    return sum(outputs)


def original_state(token_width: int, hidden: int, task_width: int, num_experts: int = 5, expert_layers: int = 2,
                   router_in: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random connector weights in the original's layout (task tokens, experts + their ``llm_proj`` twins,
    router): the original always builds the router and the task tokens, used or not."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.2: torch.randn(*shape, generator=g) * scale
    state: dict[str, torch.Tensor] = {f"task_tokens.{t}": rand(1, 1, task_width, scale=1.0) for t in TASKS}
    for e in range(num_experts):
        state[f"moe_layers.{e}.0.weight"] = rand(hidden, token_width)
        state[f"moe_layers.{e}.0.bias"] = rand(hidden)
        if expert_layers == 2:
            state[f"moe_layers.{e}.2.weight"] = rand(hidden, hidden)
            state[f"moe_layers.{e}.2.bias"] = rand(hidden)
    for key in [k for k in state if k.startswith("moe_layers.")]:
        state["llm_proj" + key[len("moe_layers"):]] = state[key]  # the same modules, saved under both names
    router_in = token_width + task_width if router_in is None else router_in
    state["router.fc1.weight"] = rand(4 * router_in, router_in, scale=1.0 / router_in ** 0.5)
    state["router.fc1.bias"] = rand(4 * router_in)
    state["router.fc2.weight"] = rand(num_experts, 4 * router_in, scale=2.0 / router_in ** 0.5)
    state["router.fc2.bias"] = rand(num_experts)
    return state


def lora_state(layers: int, width: int, intermediate: int, r: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """LoRA weights of a LLaMA under peft 0.7's names, as the original saves them (plus the rotary buffers that
    transformers 4.30 keeps in the state dict)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        prefix = f"llm_model.base_model.model.model.layers.{i}"
        for block, modules in LORA_MODULES.items():
            for module in modules:
                fan_in = intermediate if module == "down_proj" else width
                fan_out = intermediate if module in ("gate_proj", "up_proj") else width
                state[f"{prefix}.{block}.{module}.lora_A.default.weight"] = torch.randn(r, fan_in, generator=g)
                state[f"{prefix}.{block}.{module}.lora_B.default.weight"] = torch.randn(fan_out, r, generator=g) * 0.01
        state[f"{prefix}.self_attn.rotary_emb.inv_freq"] = torch.rand(width // 8, generator=g)
    return state


def write_original_checkpoint(path: Path, state: dict[str, torch.Tensor], model_config: dict[str, Any] | None,
                              epoch: int = 0) -> Path:
    """``checkpoint_<epoch>.pth`` as the original's runner writes it: model, optimizer, config, scaler, epoch."""
    save = {"model": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0, 1]}]},
            "config": None if model_config is None else {
                "model": {"arch": "uni_med", "has_moe": True, "projector_type": "moe_mlp", "num_task_tokens": 1,
                          **model_config},
                "run": {"iters_per_epoch": 50000, "max_epoch": 1, "amp": True}, "datasets": {}},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 0},
            "epoch": epoch}
    torch.save(save, path)
    return path
