"""``llm2vec-fast eval sts|mteb``: STS-B Spearman x 100, or MTEB tasks whose data is available locally."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_model_options, load_encoder

ONNX_MODEL_FILE = "model.onnx"


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
    add_onnx_option(sts)
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
    add_onnx_option(mt)
    mt.set_defaults(run=run_mteb)


def add_onnx_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--onnx",
        type=Path,
        default=None,
        metavar="DIR",
        help="score an exported ONNX folder (llm2vec-fast export) with OnnxEncoder; a --model folder holding model.onnx is one too",
    )
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: $OMP_NUM_THREADS or all cores)")


# settings an ONNX export fixed when it was written
_BAKED_IN = {
    "peft": "--peft",
    "pooling": "--pooling",
    "max_length": "--max-length",
    "doc_max_length": "--doc-max-length",
    "dtype": "--dtype",
    "no_bidirectional": "--no-bidirectional",
    "quantization": "--quantization",
    "fused": "--fused",
}


def onnx_folder(args: argparse.Namespace) -> Path | None:
    """The ONNX export to score: ``--onnx``, or ``--model`` when it is an export folder."""
    if args.onnx is not None:
        if args.model is not None:
            raise ValueError("give either --onnx DIR or --model, not both")
        if not (args.onnx / ONNX_MODEL_FILE).is_file():
            raise FileNotFoundError(f"--onnx {str(args.onnx)!r} holds no {ONNX_MODEL_FILE}; export one with `llm2vec-fast export`")
        return args.onnx
    if args.model is not None and (Path(args.model) / ONNX_MODEL_FILE).is_file():
        return Path(args.model)
    return None


def load_eval_encoder(args: argparse.Namespace):
    """An :class:`~llm2vec_fast.export.OnnxEncoder` for an ONNX export folder, else an LLM2Vec."""
    folder = onnx_folder(args)
    if folder is None:
        if args.threads is not None:
            raise ValueError("--threads applies to ONNX exports (--onnx DIR); use OMP_NUM_THREADS for torch")
        return load_encoder(args)
    fixed = [flag for attr, flag in _BAKED_IN.items() if getattr(args, attr)]
    if fixed:
        raise ValueError(f"{', '.join(fixed)} cannot change an ONNX export (fixed when it was exported); drop it or re-export")
    from ..export import OnnxEncoder

    device = (args.device or "cpu").split(":")[0]
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: an ONNX export runs on cpu or cuda")
    return OnnxEncoder.from_pretrained(folder, providers=device, num_threads=args.threads)


def run_sts(args: argparse.Namespace) -> int:
    from ..stsb import check_limit, load_stsb, stsb_spearman

    check_limit(args.limit)  # bad options and a missing file fail before the model loads
    load_stsb(args.split, args.data_dir)
    encoder = load_eval_encoder(args)
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
        load_eval_encoder(args),
        instructions=instructions,
        use_default_instructions=not args.no_default_instructions,
        model_name=args.model if args.onnx is None else None,
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
