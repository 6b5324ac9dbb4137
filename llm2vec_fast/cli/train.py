"""``llm2vec-fast train {mntp,simcse,supervised} --config FILE [--set KEY=VALUE ...] [--resume]``."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an LLM2Vec stage (MNTP, SimCSE, supervised) with LoRA",
        description=(
            "Train one LLM2Vec stage with LoRA. Options come from --config (YAML or JSON) and --set KEY=VALUE "
            "overrides (values parsed as YAML, e.g. --set lr=1e-4 --set peft=[runs/mntp/adapter]). "
            "Multi-GPU: torchrun --nproc-per-node N -m llm2vec_fast.cli train ... (batch_size is global)."
        ),
    )
    p.add_argument("stage", choices=("mntp", "simcse", "supervised"))
    p.add_argument("--config", "-c", default=None, help="YAML or JSON file of options")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override one option (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from ..train import load_config, train

    config = load_config(args.stage, args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    adapter = train(args.stage, config, resume=args.resume)
    print(f"adapter written to {adapter}")
    return 0
