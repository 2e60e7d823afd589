"""``cmoe unimed train | eval | analyze | experiment | data-stats | check-data | convert-original | clean | predict |
serve | demo | pretrain``: the recipe's command line (registered as a ``cmoe`` subcommand)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from cmoe.cli import add_clean_arguments, clean_folder
from cmoe.errors import CMoEError
from cmoe.reference_models.unimed.config import BUILTIN_CONFIGS
from cmoe.checkpointing import atomic_write


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny",
                        help=f"a YAML file, or a built-in config: {', '.join(BUILTIN_CONFIGS)} (default: tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--output-dir", help="where checkpoints, metrics and tables go (default: the config's)")


def _load(args: argparse.Namespace):
    from cmoe.reference_models.unimed.config import load_config, parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    return load_config(args.config, overrides)


def _train(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.training.elastic import restart_hazard
    from cmoe.reference_models.unimed.training.train import Trainer

    config = _load(args)
    resume = None if args.resume == "none" else args.resume
    trainer = Trainer(config, resume=resume)
    hazard = restart_hazard()
    if hazard and trainer.ctx.is_main:
        print(hazard, file=sys.stderr, flush=True)
    result = trainer.train(args.steps)
    trainer.close()
    target = config.train.steps if args.steps is None else args.steps
    if result.history and trainer.ctx.is_main:
        print(f"trained to step {result.step}: loss {result.history[-1]['loss']:.4f}; checkpoint {result.checkpoint}")
    elif trainer.ctx.is_main and result.step >= target:
        print(f"nothing to do: {result.output_dir} is already at step {result.step} (training stops at step "
              f"{target}); raise --steps or train.steps to train further, or pass another --output-dir")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.evaluation.evaluate import format_results, run_evaluation

    config = _load(args)
    protocol = args.protocol or config.eval.protocol
    results = run_evaluation(config, args.checkpoint, args.out, args.limit_per_task, protocol=protocol)
    print(format_results(results, protocol))
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.analysis.analyze import analyze_checkpoint

    config = _load(args)
    report, paths = analyze_checkpoint(config, args.checkpoint, args.out, args.batches_per_task)
    step = report.steps[-1]
    for group in ("all", "router", "projector"):
        if group in step.gradients:
            g = step.gradients[group]
            print(f"{group}: conflict index {g.direction.conflict:.4f} (mean cosine {g.direction.mean_cosine:.4f}), "
                  f"magnitude CV {g.magnitude.cv:.4f} (max/min {g.magnitude.max_min_ratio:.2f})")
    print(f"wrote {len(paths)} files to {paths[0].parent}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.config import parse_overrides
    from cmoe.reference_models.unimed.experiments.report import format_experiment
    from cmoe.reference_models.unimed.experiments.runner import load_experiment, run_experiment

    spec = load_experiment(args.experiment)
    if args.seeds:
        spec.seeds = [int(seed) for seed in args.seeds.split(",")]
    out = Path(args.output_dir or f"runs/experiments/{spec.name}")
    variants = [v for item in (args.variants or []) for v in item.split(",") if v] or None
    summary = run_experiment(spec, out, parse_overrides(args.overrides), variants)
    print(format_experiment(summary))
    if args.report_dir:
        report = Path(args.report_dir)
        report.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", "results.json", "scores.png", "conflict.png", "routing.png", "task_study.png"):
            if (out / name).is_file():
                shutil.copy2(out / name, report / name)
        print(f"results copied to {report}")
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.data.check import format_layouts
    from cmoe.reference_models.unimed.data.imax import annotation_stats, format_stats
    from cmoe.reference_models.unimed.data.splits import load_split

    config = _load(args)
    split = args.split or config.data.train_split
    samples = load_split(config.data, split, config.prompts.resolved().text_processor)
    layouts = format_layouts(config.data, split)
    if layouts:
        print(layouts)
    print(format_stats(annotation_stats(samples, identity=args.identity), title=f"{config.name}: {split} split"))
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.data.check import check_data, format_check, format_environment

    config = _load(args)
    for line in format_environment(config.data, config.model):
        print(line)
    check = check_data(config.data)
    print(format_check(check, title=config.name))
    if not check.can_train:
        problems = check.train_problems()
        raise CMoEError(f"{config.name}: cannot train, {len(problems)} problem(s) with the training data, the "
                        f"first: {problems[0][:300]}; add or fix the files listed above, or remove those datasets "
                        "from data.datasets")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.evaluation.evaluate import run_evaluation, summary_table
    from cmoe.reference_models.unimed.training.train import Trainer

    config = _load(args)
    if args.fresh and Path(config.output_dir).exists():
        demo_only_folder(config.output_dir)
        shutil.rmtree(config.output_dir)
    origin = "pretrained" if "path" in config.model.vision_encoder.options else "random-init"
    print(f"Uni-Med tiny demo: training {config.model.connector.preset!r} connector for {config.train.steps} "
          f"steps on the built-in synthetic set ({origin} frozen encoder and LLM, nothing downloaded)")
    Trainer(config, resume="auto").train()
    results = run_evaluation(config)
    mark_demo_folder(config.output_dir, results.checkpoint)
    print(summary_table(results))
    print(f"\nEvery metric: {results.path / 'eval.md'}; checkpoints, metrics.jsonl (per-task loss, routing weights "
          f"per task) and predictions in {config.output_dir}")
    return 0


DEMO_MARK = ".cmoe-demo.json"
"""Written by ``cmoe unimed demo`` into its run folder: the checkpoint it ended with."""


def mark_demo_folder(folder: str | Path, checkpoint: Path) -> None:
    text = json.dumps({"checkpoint": checkpoint.name}) + "\n"
    atomic_write(Path(folder) / DEMO_MARK, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def demo_only_folder(folder: str | Path) -> None:
    """Raise unless `folder` holds what ``cmoe unimed demo`` left there and nothing since: ``--fresh`` deletes
    only a demo's own run, never one trained further (``cmoe unimed train`` continuing it) or another run."""
    folder = Path(folder)
    if not any(folder.iterdir()):
        return
    try:
        marked = json.loads((folder / DEMO_MARK).read_text(encoding="utf-8")).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        marked = None
    from cmoe.reference_models.unimed.model.checkpoint import list_checkpoints

    newest = [path.name for _, path in list_checkpoints(folder)][-1:]
    if marked is None or (newest and newest[0] != marked):
        why = ("it was not written by cmoe unimed demo" if marked is None
               else f"it was trained further after the demo ({newest[0]}, the demo ended at {marked})")
        raise CMoEError(f"demo --fresh: not deleting {folder}: {why}; pass another --output-dir, or delete it "
                        "yourself if you mean to")


def _convert(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.paper.convert import convert_original_checkpoint

    result = convert_original_checkpoint(args.checkpoint, args.output_dir, router_type=args.router_type,
                                         router_method=args.router_method, tokenizer=args.tokenizer)
    variant = result.variant
    print(f"converted {variant.router_type} router ({variant.router_input} input, {variant.num_experts} "
          f"{variant.expert} experts, {result.lora_tensors} LoRA tensors) → preset {variant.preset!r}")
    print(f"connector (save_pretrained): {result.connector_dir}")
    if result.dropped_keys:
        print(f"read but unused by the original itself: {len(result.dropped_keys)} keys (see conversion.json)")
    print(f"evaluate with: cmoe unimed eval --config paper --checkpoint {result.output_dir} {result.set_flags()}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.config import PRETRAINED_DIR
    from cmoe.reference_models.unimed.training.pretrain import pretrain, pretrain_config

    if args.config != "tiny":
        raise CMoEError(f"--config: expected tiny (the only config whose encoder and LLM are pretrained on the "
                        f"synthetic set), got {args.config!r}")
    record = pretrain(args.out, pretrain_config(args.overrides), probes=not args.no_probes)
    print(f"wrote {args.out or PRETRAINED_DIR} in {sum(record['seconds'].values()):.0f} s")
    return 0


def _clean(args: argparse.Namespace) -> int:
    return clean_folder(args.run_dir, args.older_than, args.dry_run, command="cmoe unimed clean")


def _predict(args: argparse.Namespace) -> int:
    from cmoe.reference_models.unimed.inference.command import run

    return run(args, _load)


def _serve(args: argparse.Namespace) -> int:
    from cmoe.extras import require

    require("demo", "cmoe unimed serve")
    from cmoe.reference_models.unimed.inference.command import load_predictor
    from cmoe.reference_models.unimed.inference.web import check_port, serve

    check_port(args.port)
    predictor = load_predictor(args, _load)
    print(predictor.describe(), file=sys.stderr)
    serve(predictor, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmoe unimed", description="The Uni-Med recipe on cmoe.")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    train = commands.add_parser("train", help="train (torchrun for several processes); resumes automatically")
    _common(train)
    train.add_argument("--steps", type=int, help="stop at this step (default: train.steps)")
    train.add_argument("--resume", default="auto",
                       help="auto (continue from output_dir/latest if any), none, or a checkpoint directory")
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on every task; writes eval.md/json")
    _common(evaluate)
    evaluate.add_argument("--checkpoint", help="checkpoint directory (default: output_dir/latest)")
    evaluate.add_argument("--out", help="folder for eval.md, eval.json, predictions.jsonl (default: output_dir/eval)")
    evaluate.add_argument("--limit-per-task", type=int, help="evaluate at most this many entries per task "
                                                             "(per dataset under --protocol original)")
    evaluate.add_argument("--protocol", choices=["original", "cmoe"],
                          help="scoring: original (the original Uni-Med code's metrics, each dataset on its own) or "
                               "cmoe (ours: smoothed BLEU, SQuAD F1, lenient boxes, datasets pooled per task); "
                               "default: the config's eval.protocol (paper: original, tiny: cmoe)")
    evaluate.set_defaults(run=_eval)
    analyze = commands.add_parser("analyze", help="tug-of-war analysis of a checkpoint: gradient conflict and "
                                                  "magnitude indexes, routing, parameter statistics, plots")
    _common(analyze)
    analyze.add_argument("--checkpoint", help="checkpoint directory (default: output_dir/latest)")
    analyze.add_argument("--out", help="folder for tug_of_war.json and the PNGs (default: output_dir/tug_of_war_<step>)")
    analyze.add_argument("--batches-per-task", type=int, default=2, help="probe batches per task (default 2)")
    analyze.set_defaults(run=_analyze)
    experiment = commands.add_parser("experiment", help="train, evaluate and analyse variants over seeds "
                                                        "(CMoE vs MLP, IMAX vs DMAX); prints the comparison table")
    experiment.add_argument("--experiment", default="tug_of_war",
                            help="an experiment YAML or a built-in one: tug_of_war (the testbed, default), imax, "
                                 "cmoe_vs_mlp (random-init, superseded by tug_of_war), paper")
    experiment.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a config value in every run, e.g. --set train.steps=100")
    experiment.add_argument("--seeds", help="comma-separated seeds (default: the experiment's)")
    experiment.add_argument("--variant", "--variants", dest="variants", action="append", metavar="NAME",
                            help="run only these variants (repeat, or comma-separated); a registered router's "
                                 "name runs that router as a variant, e.g. --variant lsh_hash")
    experiment.add_argument("--output-dir", help="where the runs go (default: runs/experiments/<name>)")
    experiment.add_argument("--report-dir", help="also copy results.md/json and the plots here")
    experiment.set_defaults(run=_experiment)
    stats = commands.add_parser("data-stats", help="IMAX statistics of a config's data: tasks and entries per "
                                                   "image, entries per task (image-centric vs decentralised)")
    _common(stats)
    stats.add_argument("--split", help="which split (default: the training split)")
    stats.add_argument("--identity", default="image_id", choices=["image_id", "hash"],
                       help="how images are matched across datasets: their ids, or a hash of their pixels/bytes")
    stats.set_defaults(run=_data_stats)
    check = commands.add_parser("check-data", help="can the config's data be read? per dataset: the layout found, "
                                                   "entries per split, what is missing and the file that fixes it; "
                                                   "exits non-zero when the config cannot train")
    _common(check)
    check.set_defaults(run=_check_data)
    convert = commands.add_parser("convert-original", help="convert the original Uni-Med's checkpoint_*.pth "
                                  "into a CMoEConnector and a recipe checkpoint (eval / analyze run on it)")
    convert.add_argument("checkpoint", help="the original's checkpoint_*.pth (read with weights_only=True)")
    convert.add_argument("output_dir", help="where the connector/ folder and the recipe checkpoint go")
    convert.add_argument("--router-type", choices=["soft", "sparse", "hard", "constant"],
                         help="the original's router_type, when the checkpoint stores no config")
    convert.add_argument("--router-method", choices=["router_task_token", "router_token", "router_task"],
                         help="the original's router_method, when the checkpoint stores no config")
    convert.add_argument("--tokenizer", help="a local tokenizer directory to copy next to the checkpoint")
    convert.set_defaults(run=_convert)
    pre = commands.add_parser("pretrain", help="pretrain the tiny vision encoder and LLM on the synthetic set "
                                               "(the weights the tiny config loads); prints the probe table")
    pre.add_argument("--config", default="tiny", help="only tiny")
    pre.add_argument("--out", default=None, help="output folder (default: the shipped reference_models/unimed/"
                                                 "pretrained, overwritten)")
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="a PretrainConfig field, e.g. --set encoder_steps=200 (repeatable)")
    pre.add_argument("--no-probes", action="store_true", help="skip the linear-probe table")
    pre.set_defaults(run=_pretrain)
    clean = commands.add_parser("clean", help="remove what interrupted saves left in a run folder (temporaries of "
                                              "dead writers; others with --older-than), put back what they moved "
                                              "aside; a training run's rank 0 does the first part when it starts")
    add_clean_arguments(clean, "run_dir")
    clean.set_defaults(run=_clean)
    predict = commands.add_parser("predict", help="ask a trained model about an image (or a JSONL manifest of "
                                                  "requests): the answer, the box, the experts' weights")
    _common(predict)
    from cmoe.reference_models.unimed.inference.command import add_arguments as add_predict_arguments

    add_predict_arguments(predict)
    predict.set_defaults(run=_predict)
    serve = commands.add_parser("serve", help="a local web page to ask a trained model about an image (needs "
                                              "cmoe[demo]): answer, box drawn, expert weights")
    _common(serve)
    serve.add_argument("--checkpoint", help="a checkpoint folder (default: the latest of the run folder)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1, this "
                                                           "machine only)")
    serve.add_argument("--port", type=int, default=0, help="the port (default: 0, a free one); the URL is printed")
    serve.set_defaults(run=_serve)
    demo = commands.add_parser("demo", help="tiny train + eval on the synthetic set, prints the per-task table")
    _common(demo)
    demo.add_argument("--fresh", action="store_true", help="delete the output directory first")
    demo.set_defaults(run=_demo, config="tiny")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The Uni-Med recipe: train, eval, analyze, experiment, data-stats, check-data, predict, serve, demo, pretrain,
    convert-original, clean."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.run(args)
    except CMoEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
