"""``llm2vec-fast eval sts|mteb``: STS-B Spearman x 100, or MTEB tasks whose data is available locally."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_model_options, load_encoder


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an encoder (STS-B, MTEB)")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    sts = tasks.add_parser("sts", help="STS Benchmark: Spearman x 100 of cosine similarities")
    sts.add_argument("--split", choices=("train", "dev", "test"), default="dev")
    sts.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    sts.add_argument("--data-dir", default=None, help="STS-B folder (default: $LLM2VEC_FAST_STSB_DIR or ../shared/data/stsbenchmark)")
    sts.add_argument("--batch-size", type=int, default=32)
    sts.add_argument("--truncate-dim", type=int, default=None, metavar="D", help="score the first D dimensions only (Matryoshka)")
    sts.add_argument("--instruction", default="", help="instruction given to every sentence (default none)")
    add_model_options(sts)
    sts.set_defaults(run=run_sts)

    mt = tasks.add_parser(
        "mteb",
        help="MTEB tasks whose data is available locally",
        description="Run MTEB 2 tasks (pip install 'llm2vec-fast[mteb]') on data already on this machine (Hugging Face "
        "datasets cache or offline copies); nothing is downloaded. Instructions follow LLM2Vec: the official per-task "
        "table, queries and symmetric tasks only, never documents.",
    )
    mt.add_argument("--tasks", nargs="+", required=True, metavar="TASK", help="MTEB task names, e.g. STSBenchmark SciFact")
    mt.add_argument("--output-folder", type=Path, default=None, help="write mteb result files here (mteb's results layout)")
    mt.add_argument("--batch-size", type=int, default=32)
    mt.add_argument("--truncate-dim", type=int, default=None, metavar="D", help="evaluate the first D dimensions only (Matryoshka)")
    mt.add_argument(
        "--instructions",
        type=Path,
        default=None,
        metavar="FILE.json",
        help='JSON object of task name -> instruction overriding the defaults ("" for none)',
    )
    mt.add_argument("--no-default-instructions", action="store_true", help="no instruction unless --instructions names the task")
    add_model_options(mt)
    mt.set_defaults(run=run_mteb)


def run_sts(args: argparse.Namespace) -> int:
    from ..stsb import load_stsb, stsb_spearman

    load_stsb(args.split, args.data_dir)  # a missing file fails before the model loads
    encoder = load_encoder(args)
    score = stsb_spearman(
        encoder,
        args.split,
        limit=args.limit,
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        truncate_dim=args.truncate_dim,
        instruction=args.instruction,
    )
    dims = f", first {args.truncate_dim} dims" if args.truncate_dim else ""
    print(f"STS-B {args.split} Spearman x100{dims}: {score:.2f}")
    return 0


def run_mteb(args: argparse.Namespace) -> int:
    from ..integrations.mteb import MTEBEncoder, get_tasks, load_task_data
    from ..integrations.mteb import run_mteb as evaluate

    instructions = None
    if args.instructions is not None:
        if not args.instructions.is_file():
            raise FileNotFoundError(f"--instructions file {str(args.instructions)!r} does not exist")
        instructions = json.loads(args.instructions.read_text(encoding="utf-8"))
        if not isinstance(instructions, dict):
            raise ValueError("--instructions must hold a JSON object of task name -> instruction")
    tasks = get_tasks(args.tasks)
    for task in tasks:  # a task without local data fails before the model loads
        load_task_data(task)
    model = MTEBEncoder(
        load_encoder(args),
        instructions=instructions,
        use_default_instructions=not args.no_default_instructions,
        model_name=args.model,
        batch_size=args.batch_size,
        truncate_dim=args.truncate_dim,
    )
    results = evaluate(model, tasks, output_folder=args.output_folder, batch_size=args.batch_size)
    for name, splits in results.items():
        for split, scores in splits.items():
            print(f"{name} {split}: main score {scores.get('main_score', float('nan')):.4f}")
    if args.output_folder is not None:
        print(f"results written under {args.output_folder}")
    return 0
