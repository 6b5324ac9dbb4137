"""Training configurations: one dataclass per stage, defaults from the official LLM2Vec configs.

A config comes from a YAML or JSON file (``--config FILE``) and ``--set key=value`` overrides
(values parsed as YAML: ``--set lr=1e-4 --set peft=[runs/mntp/adapter]``). Unknown keys, bad
values and missing data files are reported before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# Phi-3 stacks its projections (qkv_proj, gate_up_proj); peft skips names a model does not have
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"]
BATCH_LAYOUTS = ("auto", "padded", "packed")


class ConfigError(ValueError):
    """A training configuration is invalid."""


@dataclass
class TrainConfig:
    """Options shared by every stage (``batch_size`` is the global batch, over all ranks)."""

    data: str | list[str] | None = None
    output_dir: str | None = None  # default: runs/<stage> (runs/mntp, runs/simcse, runs/supervised)
    model: str | None = None  # None / "default": the embedded base model, untrained ("default-base")
    peft: list[str] = field(default_factory=list)  # earlier adapters, merged before training (MNTP -> SimCSE)
    seed: int = 42
    lr: float = 5e-5
    max_steps: int = 1000
    batch_size: int = 32
    max_length: int = 512
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    lora_layers: int | None = None  # LoRA on the last N layers only (None: all); lower layers then need no backward
    gradient_checkpointing: bool = False
    # fused norms (residual add included) and Liger-Kernel RoPE on CUDA, with their backward; the
    # projections stay separate, as LoRA needs them (llm2vec_fast/fused_layers.py)
    fused: bool = False
    save_steps: int = 100
    save_total_limit: int = 2
    log_file: str | None = None  # default: <output_dir>/log.jsonl
    device: str | None = None  # default: cuda if available
    batch_layout: str = "auto"  # auto: packed on CUDA (varlen kernels), padded on CPU
    progress: bool = True
    micro_batch_size: int = 16  # padded layout, one process: rows per length-sorted forward (0: one forward per batch)
    # "int8": train through the int8 export's rounding (docs/training.md, train/quantization_aware.py)
    quantization_aware: str | None = None
    # 7 or 8; null: what the export chooses on this CPU (export/cpu_int8.py), filled in when the config is made
    quantization_aware_weight_bits: int | None = None

    stage = "base"

    def __post_init__(self) -> None:
        if self.output_dir is None:  # one folder per stage: the MNTP -> SimCSE chain keeps both adapters
            self.output_dir = f"runs/{self.stage}"
        # resolved here so that train_config.json records the bits the run used
        if self.quantization_aware == "int8" and self.quantization_aware_weight_bits is None:
            from ..export.cpu_int8 import int8_weight_bits

            self.quantization_aware_weight_bits = int8_weight_bits("auto")

    def validate(self, check_files: bool = True) -> None:
        for name in ("lr", "max_steps", "batch_size", "max_length", "lora_r", "lora_alpha", "save_steps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "weight_decay", "max_grad_norm", "save_total_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.micro_batch_size < 0:
            raise ConfigError(f"micro_batch_size must be >= 0, got {self.micro_batch_size!r}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise ConfigError(f"lora_layers must be a positive number of layers or null, got {self.lora_layers!r}")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules is empty")
        if self.batch_layout not in BATCH_LAYOUTS:
            raise ConfigError(f"batch_layout must be one of {BATCH_LAYOUTS}, got {self.batch_layout!r}")
        self._validate_quantization_aware()
        if self.data is None or self.data == [] or self.data == "":
            raise ConfigError(f"no training data: set `data` (a file, or a list of files) for the {self.stage} stage")
        if check_files:
            for path in self.data_files():
                if path == "stsb:train":
                    continue
                if not Path(path).is_file():
                    raise ConfigError(f"data file {path!r} does not exist")
            from .trainer import written_paths  # here: trainer imports this module

            for adapter in self.peft:
                if not (Path(adapter) / "adapter_config.json").is_file():
                    raise ConfigError(f"peft adapter {adapter!r} has no adapter_config.json")
                if any(Path(adapter).resolve().is_relative_to(place.resolve()) for place in written_paths(self.output_dir)):
                    raise ConfigError(
                        f"peft adapter {adapter!r} lies where this run writes in its output_dir {self.output_dir!r} (its "
                        "adapter, which it overwrites, or its checkpoints, which it clears): set another output_dir"
                    )
            from ..default_model import is_default_model

            if not is_default_model(self.model) and not Path(self.model).is_dir():
                raise ConfigError(f"model folder {self.model!r} does not exist")

    def _validate_quantization_aware(self) -> None:
        from ..export.cpu_int8 import WEIGHT_LEVELS
        from .quantization_aware import SCHEMES

        if self.quantization_aware is not None and self.quantization_aware not in SCHEMES:
            raise ConfigError(
                f"quantization_aware must be one of {SCHEMES} (the ONNX int8 export's scheme) or null, got {self.quantization_aware!r}"
            )
        bits = self.quantization_aware_weight_bits
        if bits is not None and bits not in WEIGHT_LEVELS:
            raise ConfigError(
                f"quantization_aware_weight_bits must be one of {tuple(WEIGHT_LEVELS)} (the int8 export's weights: 7-bit on CPUs "
                f"without VNNI/AMX, 8-bit with them) or null for this CPU's choice, got {bits!r}"
            )
        if bits is not None and self.quantization_aware is None:
            raise ConfigError("quantization_aware_weight_bits is set but quantization_aware is not: add quantization_aware: int8")

    def data_files(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data or [])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MNTPConfig(TrainConfig):
    """Masked next-token prediction (official: lr 5e-5, 1000 steps, batch 32, 512 tokens, 20 % masked)."""

    mlm_probability: float = 0.2
    full_masking: bool = False  # True: every selected token becomes the mask token (no 80/10/10)
    loss_chunk_size: int = 1024  # rows of the chunked linear cross-entropy

    stage = "mntp"

    def validate(self, check_files: bool = True) -> None:
        super().validate(check_files)
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {self.mlm_probability!r}")
        if self.loss_chunk_size < 1:
            raise ConfigError("loss_chunk_size must be positive")


@dataclass
class ContrastiveConfig(TrainConfig):
    pooling_mode: str = "mean"
    loss_scale: float = 20.0
    attention_dropout: float = 0.0
    gradcache: bool = False  # GradCache: embed in chunks without grad, then re-forward chunk by chunk
    gradcache_chunk_size: int = 16
    # Matryoshka: the loss is summed over these embedding prefixes (e.g. [64, 128, 256, 576]; include
    # the full hidden size to keep training it); empty: plain loss. Weights default to 1 each.
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] = field(default_factory=list)

    def validate(self, check_files: bool = True) -> None:
        super().validate(check_files)
        from ..encoding import POOLING_MODES

        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
            raise ConfigError(f"matryoshka_dims must be positive integers, got {dims!r}")
        if len(set(dims)) != len(dims):
            raise ConfigError(f"matryoshka_dims has duplicates: {dims!r}")
        if weights and len(weights) != len(dims):
            raise ConfigError(f"matryoshka_weights needs one weight per matryoshka_dims entry ({len(dims)}), got {weights!r}")
        if any(w <= 0 for w in weights):
            raise ConfigError(f"matryoshka_weights must be positive, got {weights!r}")

        if self.pooling_mode not in POOLING_MODES:
            raise ConfigError(f"pooling_mode must be one of {POOLING_MODES}, got {self.pooling_mode!r}")
        if not 0 <= self.attention_dropout < 1:
            raise ConfigError(f"attention_dropout must be in [0, 1), got {self.attention_dropout!r}")
        if self.gradcache_chunk_size < 1:
            raise ConfigError("gradcache_chunk_size must be positive")
        if self.loss_scale <= 0:
            raise ConfigError("loss_scale must be positive")


@dataclass
class SimCSEConfig(ContrastiveConfig):
    """Unsupervised SimCSE (official: lr 3e-5, batch 128, 128 tokens, 1000 steps, attention dropout 0.3)."""

    lr: float = 3e-5
    batch_size: int = 128
    max_length: int = 128
    attention_dropout: float = 0.3

    stage = "simcse"

    def validate(self, check_files: bool = True) -> None:
        super().validate(check_files)
        if self.batch_size < 2:  # the other texts of the batch are the only negatives
            raise ConfigError(f"SimCSE needs a batch_size of at least 2 (in-batch negatives), got {self.batch_size}")


@dataclass
class SupervisedConfig(ContrastiveConfig):
    """Supervised contrastive on (query, positive, hard negative) JSONL (official: lr 2e-4, warmup 300,
    batch 64, 512 tokens)."""

    lr: float = 2e-4
    warmup_steps: int = 300
    batch_size: int = 64
    max_length: int = 512

    stage = "supervised"


# option names of the official (HF Trainer) configs -> ours, for "did you mean" hints
OFFICIAL_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "max_seq_length": "max_length",
    "warmup_ratio": "warmup_steps",
    "lora_r": "lora_r",
    "model_name_or_path": "model",
    "peft_model_name_or_path": "peft",
    "dataset_file_path": "data",
    "train_file": "data",
    "simcse_dropout": "attention_dropout",
    "loss_scale": "loss_scale",
}

STAGES = {"mntp": MNTPConfig, "simcse": SimCSEConfig, "supervised": SupervisedConfig}


def read_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    import yaml

    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise ConfigError(f"config file {str(path)!r} is not valid {kind}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return data


def parse_overrides(items: list[str] | None) -> dict:
    """``["lr=1e-4", "peft=[a, b]"]`` -> ``{"lr": 1e-4, "peft": ["a", "b"]}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from None
    return out


# integer options whose default is null
OPTIONAL_INT_KEYS = {"lora_layers", "quantization_aware_weight_bits"}
# list options holding numbers (the other list options hold strings)
NUMBER_LIST_KEYS = {"matryoshka_dims": int, "matryoshka_weights": float}


def _is_number(value, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def _coerce(cls, key: str, value):
    f = {x.name: x for x in dataclasses.fields(cls)}[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        if default is None:  # an optional setting: null is its default
            return None
        if key == "peft":
            return []
        raise ConfigError(f"{key} cannot be null: give a value, or leave it out for the default {default!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int) or key in OPTIONAL_INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if key in NUMBER_LIST_KEYS:
        kind = NUMBER_LIST_KEYS[key]
        value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, list) or not all(_is_number(v, kind) for v in value):
            raise ConfigError(f"{key} must be a list of {kind.__name__}s, got {value!r}")
        return [kind(v) for v in value]
    if isinstance(default, list):
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} must be a list of strings, got {value!r}")
        return list(value)
    if key == "data":
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            return value
        raise ConfigError(f"data must be a path or a list of paths, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def make_config(stage: str, values: dict | None = None, check_files: bool = True) -> TrainConfig:
    """Build and validate the config of ``stage`` from a mapping (unknown keys are errors)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; expected one of {tuple(STAGES)}")
    cls = STAGES[stage]
    names = [f.name for f in dataclasses.fields(cls)]
    values = dict(values or {})
    recorded = values.pop("stage", stage)  # a run's train_config.json records it: that file works as --config
    if recorded != stage:
        raise ConfigError(f"this config is for the {recorded!r} stage, not {stage!r}")
    unknown = sorted(set(values) - set(names))
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = [OFFICIAL_NAMES[key]] if key in OFFICIAL_NAMES else difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown {stage} config key(s): {', '.join(hints)}. Valid keys: {', '.join(names)}")
    config = cls(**{k: _coerce(cls, k, v) for k, v in values.items()})
    config.validate(check_files)
    return config


def load_config(
    stage: str, path: str | os.PathLike | None = None, overrides: list[str] | None = None, check_files: bool = True
) -> TrainConfig:
    values = read_config_file(path) if path else {}
    values.update(parse_overrides(overrides))
    return make_config(stage, values, check_files)
