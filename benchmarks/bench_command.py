"""``cmoe bench``: time the dispatch backends on one shape, the way ``backend="auto"`` does; ``--auto`` shows what
auto chooses there and why. (The full comparison with peers and the roofline is ``python -m cmoe.benchmarks.run``.)"""

from __future__ import annotations

import argparse

import torch

import cmoe
from cmoe.auto import AutoSelector, shape_class
from cmoe.dispatch import table_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmoe bench", description=" ".join(__doc__.split()),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens routed (rows of x)")
    parser.add_argument("--in-features", type=int, default=1408, help="expert input width")
    parser.add_argument("--out-features", type=int, default=2048, help="expert output width")
    parser.add_argument("--hidden", type=int, default=None, help="MLP hidden width (None: out-features)")
    parser.add_argument("--experts", type=int, default=8, help="number of experts E")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token k (k = E: dense routing)")
    parser.add_argument("--expert", choices=["mlp", "linear"], default="mlp", help="expert type")
    parser.add_argument("--no-bias", action="store_true", help="experts without bias")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of x and the experts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    parser.add_argument("--mode", choices=["both", "inference", "training"], default="both",
                        help="time forward only, forward+backward, or both")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per candidate (the minimum counts)")
    parser.add_argument("--auto", action="store_true",
                        help="show auto's choice and why (honours CMOE_AUTO and the cache file)")
    parser.add_argument("--cache", default=None, help="auto's JSON cache file (default: $CMOE_AUTO_CACHE)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs and routing")
    return parser


def _inputs(args: argparse.Namespace) -> tuple[cmoe.StackedExperts, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(args.seed)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    if args.expert == "mlp":
        experts = cmoe.MLPExperts(args.experts, args.in_features, args.out_features, hidden_features=args.hidden,
                                  bias=not args.no_bias)
    else:
        experts = cmoe.LinearExperts(args.experts, args.in_features, args.out_features, bias=not args.no_bias)
    x = torch.randn(args.tokens, args.in_features)
    scores, index = torch.randn(args.tokens, args.experts).topk(args.top_k, dim=-1)
    return (experts.to(device, dtype), x.to(device, dtype), index.to(device),
            scores.softmax(-1).to(device, dtype))


def bench_command(argv: list[str]) -> int:
    """Time the dispatch backends on one shape; --auto shows auto's choice there and why."""
    args = _parser().parse_args(argv)
    experts, x, index, weight = _inputs(args)
    selector = AutoSelector(cache_path=args.cache, rounds=args.rounds)
    fallback = table_backend(x.device, args.experts, args.top_k)
    modes = ["inference", "training"] if args.mode == "both" else [args.mode]
    for mode in modes:
        training = mode == "training"
        experts.requires_grad_(training)
        x.requires_grad_(training)
        weight.requires_grad_(training)
        key = shape_class(x, experts, index, weight).key
        print(f"{mode}: {key}")
        if args.auto:
            print(f"  auto picks {selector.choose(x, experts, index, weight, fallback).explain()}")
            continue
        choice = selector.measure(x, experts, index, weight, fallback)
        for name, ms in sorted(choice.times_ms.items(), key=lambda item: item[1]):
            print(f"  {name:<12} {ms:10.3f} ms")
        for name, why in sorted(choice.skipped.items()):
            print(f"  {name:<12} not timed: {why}")
    return 0
