"""The training loop shared by every stage: model + LoRA, AdamW, linear warmup/decay, DDP,
tqdm progress, JSONL logs, atomic checkpoints and bit-for-bit resume (on CPU).

A stage (``mntp``, ``simcse``, ``supervised``) implements :class:`Stage`: it loads its data,
builds its peft model, and runs one optimisation step's forward and backward passes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import TrainConfig
from .data import BatchSchedule

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # final adapter: <output_dir>/adapter
CHECKPOINTS_DIR = "checkpoints"  # <output_dir>/checkpoints/checkpoint-<step>


def written_paths(output_dir: str | os.PathLike) -> tuple[Path, ...]:
    """What a run replaces or clears in ``output_dir``: its adapter (and the temp dir it is written
    to first) and its checkpoints."""
    out = Path(output_dir)
    return out / ADAPTER_DIR, out / f".tmp-{ADAPTER_DIR}", out / CHECKPOINTS_DIR


CHECKPOINT_PREFIX = "checkpoint-"


# --------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` (``(0, 1)`` without an initialised process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Initialise torch.distributed from torchrun's environment (``WORLD_SIZE`` > 1); returns
    whether this process initialised it."""
    import torch.distributed as dist

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def pick_device(config: TrainConfig) -> torch.device:
    if config.device:
        device = torch.device(config.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # NCCL and the Triton kernels use the current device
    return device


# ----------------------------------------------------------------------------- the model
def add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """Wrap the bare decoder ``model`` in a peft LoRA model (adapter keys then apply to ``AutoModel``)."""
    from peft import LoraConfig, get_peft_model

    layers = None
    if config.lora_layers is not None:
        n = int(model.config.num_hidden_layers)
        layers = list(range(max(0, n - config.lora_layers), n))
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
        task_type=None,
    )
    return get_peft_model(model, lora)


def add_quantization_aware(peft_model: nn.Module, config: TrainConfig):
    """With ``quantization_aware: int8``, the int8 export's rounding in every decoder linear layer of
    ``peft_model`` (:class:`~.quantization_aware.QuantizationAwareInt8`, returned); else ``None``."""
    if config.quantization_aware is None:
        return None
    from .quantization_aware import QuantizationAwareInt8

    return QuantizationAwareInt8(peft_model, config.quantization_aware_weight_bits)


def fuse_for_training(decoder: nn.Module, config: TrainConfig) -> dict | None:
    """With ``fused: true``, the fused decoder layers that have a backward: norms (with the residual
    add) and RoPE; q/k/v and gate/up stay separate GEMMs, since LoRA wraps each. Returns the fusion
    report (``None`` without ``fused``)."""
    if not config.fused:
        return None
    from ..fused_layers import fuse_decoder

    report = fuse_decoder(decoder, projections=False)
    logger.info("fused layers for training: %s", report)
    return report


def enable_checkpointing(decoder: nn.Module) -> None:
    decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def autocast(device: torch.device):
    """bf16 autocast on GPU, nothing (fp32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def pick_layout(layout: str, device: torch.device) -> str:
    """``auto``: packed varlen batches on CUDA (the kernels' attention and pooling), padded on CPU."""
    if layout == "auto":
        return "packed" if device.type == "cuda" else "padded"
    return layout


def packed_forward(net: nn.Module, model: nn.Module, features: dict, device: torch.device) -> torch.Tensor:
    """Last hidden states ``[T, D]`` of a packed batch (:func:`llm2vec_fast.packing.pack`) through
    ``net`` (the peft model or its DDP wrapper) with the varlen attention switched on for ``model``'s
    decoder. The model must be bidirectional."""
    from ..varlen_attention import packed_hidden_states

    with autocast(device):
        return packed_hidden_states(net, model, features)


def base_model_name(config: TrainConfig) -> str | None:
    """The model a stage trains: the untrained base (``default-base``) when ``model`` names the
    default, since the recipe starts from the base model, not from the shipped default encoder."""
    from ..default_model import DEFAULT_BASE_NAME, is_default_encoder

    return DEFAULT_BASE_NAME if is_default_encoder(config.model) else config.model


def resolve_base(config: TrainConfig) -> str:
    from ..loading import resolve_model_path

    return resolve_model_path(base_model_name(config))[0]


class Stage:
    """One training stage. Subclasses set ``self.peft_model`` (the LoRA-wrapped bare decoder)
    and ``self.net`` (what forward calls go through: the peft model or its DDP wrapper)."""

    name = "stage"

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config, self.device = config, device
        self.peft_model: nn.Module | None = None
        self.net: nn.Module | None = None
        self.quantization_aware = None  # set by build() with quantization_aware: int8

    # data: called before any model is loaded, so bad data fails fast
    def load_data(self) -> BatchSchedule:
        raise NotImplementedError

    def build(self) -> None:
        raise NotImplementedError

    def step(self, indices: list[int]) -> tuple[torch.Tensor, int]:
        """Forward and backward of this rank's samples; returns ``(loss, n_tokens)``."""
        raise NotImplementedError

    def llm2vec_config(self) -> dict | None:
        """``llm2vec_config.json`` written next to the adapter."""
        return None

    def inference_lengths(self) -> dict[str, int]:
        """``max_length`` / ``doc_max_length`` the trained encoder keeps: those stored with the model
        (its last earlier adapter, else its folder), else the defaults (512 / 400). The training
        length (``config.max_length``) is a training setting: it goes to ``train_config.json``, and
        does not cut the documents of every later ``encode()``."""
        from ..encoding import DEFAULT_DOC_MAX_LENGTH, DEFAULT_MAX_LENGTH
        from ..loading import read_encoder_settings

        stored, _ = read_encoder_settings(self.config.peft[-1] if self.config.peft else resolve_base(self.config))
        return {
            "max_length": int(stored.get("max_length", DEFAULT_MAX_LENGTH)),
            "doc_max_length": int(stored.get("doc_max_length", DEFAULT_DOC_MAX_LENGTH)),
        }

    def save_adapter(self, path: str | os.PathLike) -> None:
        self.peft_model.save_pretrained(path, safe_serialization=True)
        settings = self.llm2vec_config()
        if settings is not None:
            with open(Path(path) / "llm2vec_config.json", "w") as f:
                json.dump(settings, f, indent=4)

    def wrap_ddp(self) -> None:
        _, world = dist_info()
        self.net = self.peft_model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.peft_model, device_ids=ids)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------- optimisation
def make_scheduler(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict:
    """Every RNG's state, in types ``torch.load(..., weights_only=True)`` reads (numpy's key as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # an ndarray in earlier checkpoints
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------- checkpoints
def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = []
    for p in root.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = p.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (p / "trainer_state.pt").is_file():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(stage: Stage, optimizer, scheduler, step: int, keep: int) -> Path:
    """Write ``checkpoints/checkpoint-<step>`` atomically (temp dir, then rename). Holds the adapter,
    the trainable weights, optimizer, scheduler, every rank's RNG state and the data position."""
    import torch.distributed as dist

    rank, world = dist_info()
    root = Path(stage.config.output_dir) / CHECKPOINTS_DIR
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        stage.save_adapter(tmp / ADAPTER_DIR)
        state = {
            "step": step,
            "stage": stage.config.stage,
            "world_size": world,
            "trainable": {n: p.detach().cpu().clone() for n, p in stage.trainable_parameters().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rngs,
            "config": stage.config.to_dict(),
        }
        torch.save(state, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(stage.config.output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return final


def read_trainer_state(path: Path) -> dict:
    """A checkpoint's ``trainer_state.pt``, read with ``weights_only=True``. Checkpoints of earlier
    versions hold numpy's RNG key as an ndarray: only the numpy types it needs are allowed for them."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            from numpy._core.multiarray import _reconstruct
        except ImportError:  # numpy 1.x
            from numpy.core.multiarray import _reconstruct

        # numpy 2 pickles name numpy._core, numpy 1 numpy.core: both point at the same function
        allowed = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, np.dtypes.UInt32DType]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: Path, stage: Stage, optimizer, scheduler) -> int:
    rank, world = dist_info()
    state = read_trainer_state(path / "trainer_state.pt")
    if state.get("stage", stage.config.stage) != stage.config.stage:
        raise RuntimeError(
            f"checkpoint {path} is of a {state['stage']} run, not {stage.config.stage}: resume it with "
            f"`train {state['stage']}`, or give this run another output_dir"
        )
    if state["world_size"] != world:
        raise RuntimeError(f"checkpoint {path} was written with {state['world_size']} ranks, this run has {world}")
    params = stage.trainable_parameters()
    missing = set(params) ^ set(state["trainable"])
    if missing:
        raise RuntimeError(f"checkpoint {path} does not match the model's trainable parameters: {sorted(missing)[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank])
    return int(state["step"])


# ------------------------------------------------------------------------------ logging
class JsonlLog:
    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.is_file():  # drop what a killed run logged after its checkpoint
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# -------------------------------------------------------------------------------- train
def train(stage_name: str, config: TrainConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run a stage; returns the final adapter folder (``<output_dir>/adapter``).

    ``resume``: continue from the newest complete checkpoint in ``output_dir`` (a fresh start
    when there is none). ``stop_after``: raise :class:`InterruptedError` after that many steps
    (tests use it to simulate a crash).
    """
    from tqdm.auto import tqdm

    from . import STAGE_CLASSES

    config.validate()
    device = pick_device(config)
    own_pg = init_distributed(device)
    try:
        rank, world = dist_info()
        if config.batch_size % world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} ranks")
        stage: Stage = STAGE_CLASSES[stage_name](config, device)
        schedule = stage.load_data()  # fails before the model is loaded
        output_dir = Path(config.output_dir)
        found = checkpoints(output_dir) if resume else []
        stale = not resume and bool(checkpoints(output_dir))
        if world > 1:  # every rank looks before rank 0 deletes, and none goes on before it has
            import torch.distributed as dist

            dist.barrier()
        if stale:
            # an earlier run's checkpoints would outrank this run's in the rotation and in a later --resume
            logger.warning("%s holds an earlier run's checkpoints; deleting them and starting over (--resume continues it)", output_dir)
            if rank == 0:
                shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
        if world > 1:
            dist.barrier()
        seed_everything(config.seed)
        stage.build()
        stage.wrap_ddp()
        params = list(stage.trainable_parameters().values())
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = make_scheduler(optimizer, config.warmup_steps, config.max_steps)
        start = load_checkpoint(found[-1], stage, optimizer, scheduler) if found else 0
        if found:
            logger.warning("resuming from %s (step %d)", found[-1], start)
        if rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "train_config.json").write_text(json.dumps({"stage": stage_name, **config.to_dict()}, indent=2))
        log = JsonlLog(Path(config.log_file or output_dir / "log.jsonl"), rank == 0, start if found else None)
        bar = tqdm(total=config.max_steps, initial=start, desc=stage_name, disable=not (config.progress and rank == 0))
        t0 = time.perf_counter()
        for step in range(start, config.max_steps):
            if stop_after is not None and step - start >= stop_after:
                raise InterruptedError(f"stopped after step {step}")
            tic = time.perf_counter()
            stage.peft_model.train()
            from .data import rank_slice

            loss, n_tokens = stage.step(rank_slice(schedule.batch(step), rank, world))
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm) if config.max_grad_norm > 0 else None
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value, n_tokens = _reduce_for_log(loss.detach().float(), n_tokens, device)
            dt = time.perf_counter() - tic
            row = {
                "step": step + 1,
                "loss": loss_value,
                "lr": lr,
                "tokens": n_tokens,
                "tokens_per_s": n_tokens / dt if dt > 0 else None,
                "step_s": dt,
                "elapsed_s": time.perf_counter() - t0,
            }
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            log.write(row)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if (step + 1) % config.save_steps == 0 and step + 1 < config.max_steps:
                save_checkpoint(stage, optimizer, scheduler, step + 1, config.save_total_limit)
        bar.close()
        final, tmp, _ = written_paths(output_dir)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            stage.save_adapter(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        return final
    finally:
        if own_pg:
            import torch.distributed as dist

            dist.destroy_process_group()


def _reduce_for_log(loss: torch.Tensor, n_tokens: int, device: torch.device) -> tuple[float, int]:
    """Mean loss and total tokens over ranks (for logging only)."""
    import torch.distributed as dist

    _, world = dist_info()
    if world == 1:
        return float(loss), int(n_tokens)
    t = torch.stack([loss.to(device), torch.tensor(float(n_tokens), device=device)])
    dist.all_reduce(t)
    return float(t[0] / world), int(t[1])
