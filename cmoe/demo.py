"""The core library's demo (the project's main job is ``cmoe unimed demo``): train a connector on a small
synthetic multi-task problem and report per task.

Every task sees visual tokens from the same distribution but wants a different projection of them
(``y = x·S + x·D_task`` through a GELU, plus noise): a plain MLP connector, blind to the task, can only fit a
compromise — the connector-level "tug-of-war". A CMoE connector whose router sees the task can give tasks
their own experts. Both train with the same steps, batch, optimiser and seed, one task per batch (Uni-Med's
mix). Runs in seconds on a CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmoe.aggregation import aggregate_tokens
from cmoe.config import CMoEConfig, MLPConnectorConfig
from cmoe.connector import PretrainedConnector, build_connector
from cmoe.stats import routing_stats


@dataclass
class MultiTaskProblem:
    """Teacher projections for `num_tasks` tasks over shared token statistics."""

    in_features: int
    out_features: int
    tokens: int
    num_tasks: int
    aggregate: int = 1
    seed: int = 0
    noise: float = 0.05

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(self.seed)
        width = self.in_features * self.aggregate
        self.shared = torch.randn(width, self.out_features, generator=gen) * width ** -0.5
        self.specific = torch.randn(self.num_tasks, width, self.out_features, generator=gen) * width ** -0.5

    def batch(self, task: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw visual tokens ``[size, tokens, in]`` and targets ``[size, tokens / aggregate, out]``."""
        x = torch.randn(size, self.tokens, self.in_features, generator=gen)
        y = F.gelu(aggregate_tokens(x, self.aggregate) @ (self.shared + self.specific[task]))
        return x, y + self.noise * torch.randn(y.shape, generator=gen)


def train(model: PretrainedConnector, problem: MultiTaskProblem, steps: int, batch: int, lr: float,
          seed: int) -> list[float]:
    """Train with one task per step (uniform mix); return the final per-task MSE on held-out batches."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, steps)
    for _ in range(steps):
        task = int(torch.randint(problem.num_tasks, (1,), generator=gen))
        x, y = problem.batch(task, batch, gen)
        out = model(x, torch.full((batch,), task))
        loss = F.mse_loss(out.hidden_states, y) + out.aux_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
    return evaluate(model, problem, seed)


@torch.no_grad()
def evaluate(model: PretrainedConnector, problem: MultiTaskProblem, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    model.eval()
    losses = []
    for task in range(problem.num_tasks):
        x, y = problem.batch(task, 64, gen)
        losses.append(float(F.mse_loss(model(x, torch.full((64,), task)).hidden_states, y)))
    model.train()
    return losses


@torch.no_grad()
def tokens_per_expert_by_task(model: PretrainedConnector, problem: MultiTaskProblem) -> list[list[int]]:
    gen = torch.Generator().manual_seed(20_000)
    rows = []
    for task in range(problem.num_tasks):
        x, _ = problem.batch(task, 16, gen)
        rows.append(routing_stats(model(x, torch.full((16,), task)).routing).tokens_per_expert.tolist())
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(prog="cmoe demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--router", default="task_token")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--load-balance", type=float, default=0.0, help="Switch balance-loss coefficient")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))

    width, out, tokens, aggregate = 16, 32, 16, 4
    problem = MultiTaskProblem(width, out, tokens, args.tasks, aggregate, seed=args.seed)
    configs = {
        "mlp": MLPConnectorConfig(width, out, aggregate_tokens=aggregate),
        "cmoe": CMoEConfig(width, out, num_experts=args.experts, top_k=args.top_k, router=args.router,
                           num_tasks=args.tasks, aggregate_tokens=aggregate, load_balance_coef=args.load_balance),
    }
    print(f"synthetic multi-task problem: {args.tasks} tasks, {tokens} visual tokens x {width} "
          f"-> aggregate {aggregate} -> {out}; {args.steps} steps, batch {args.batch}, seed {args.seed}")
    results, models = {}, {}
    for name, config in configs.items():
        torch.manual_seed(args.seed)
        model = build_connector(config)
        params = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        results[name] = train(model, problem, args.steps, args.batch, args.lr, args.seed)
        models[name] = model
        print(f"  trained {name:<5} ({params:,} parameters) in {time.perf_counter() - start:.1f}s")

    print("\nheld-out MSE per task (lower is better)")
    header = ["connector", *[f"task {t}" for t in range(args.tasks)], "mean"]
    print(_table(header, [[n, *[f"{v:.4f}" for v in r], f"{sum(r) / len(r):.4f}"] for n, r in results.items()]))

    cmoe = models["cmoe"]
    print(f"\nCMoE tokens per expert, by task (router {args.router!r}, top_k={cmoe.router.top_k}, "
          f"{args.experts} experts; 16 samples x {tokens // aggregate} tokens x k slots)")
    rows = tokens_per_expert_by_task(cmoe, problem)
    print(_table(["task", *[f"expert {e}" for e in range(args.experts)]],
                 [[str(t), *map(str, row)] for t, row in enumerate(rows)]))
    return results


if __name__ == "__main__":
    main()
