"""The one config tree: model (with its MoE layer), data, training. Loaded from YAML/JSON files,
overridden from the command line with dotted keys (``train.steps=100``), validated up front.

Validation is one function, ``validate``: run at load (``load_config``, ``config_from_dict``,
``model_config_from_dict``) and once more by the trainer when the world size is known, which adds the
rules that need it. Nothing built from a config (model, layers, routers, backends) checks it again, and
nothing built from it writes to it (evaluation settings live on the modules: ``set_inference``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .configtools import (
    ConfigError,
    apply_overrides,
    check_choice,
    check_positive,
    check_range,
    fail,
    from_dict,
    load_yaml,
    to_dict,
)
from .moe.layer import MoEConfig
from .monitor import TRACKERS
from .schedule import SCHEDULES

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
"""The shipped configs (package data; the repository's top-level configs/ is the user-facing copy)."""
DS_CONFIG_DIR = PACKAGE_DIR / "ds_configs"
"""The shipped DeepSpeed JSON configs (package data; likewise copied to the top-level ds_configs/)."""
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")
ARCHS = ("gpt2", "llama")


@dataclass
class UniformityConfig:
    """A uniformity (InfoNCE) loss on every FFN's input (dense or MoE), without S2MoE's noisy pathway: the
    control for the ingredient S2MoE's ablations credit. It is S2MoE's L_u with ``x_hat = x`` (what the
    no-noise ablation trains with): ``coef * InfoNCE(h, h)`` over the micro-batch's tokens, anchors and
    positives both the FFN input ``h``, ``num_negatives`` sampled tokens as negatives, cosine / temperature;
    its gradient pushes tokens' FFN inputs apart. Defaults are S2MoE's (beta 0.1, tau 0.1, 64 negatives)."""

    coef: float = 0.0
    """Weight of the loss (0: off)."""
    temperature: float = 0.1
    num_negatives: int = 64
    """Negatives per anchor, sampled from the micro-batch's tokens; 0 uses all of them."""

    def validate(self, prefix: str = "model.uniformity") -> None:
        check_positive(f"{prefix}.coef", self.coef, allow_zero=True)
        check_positive(f"{prefix}.temperature", self.temperature)
        check_positive(f"{prefix}.num_negatives", self.num_negatives, allow_zero=True)


@dataclass
class ModelConfig:
    vocab_size: int = 0
    """Vocabulary size; 0 takes it from the prepared dataset's meta.json."""
    arch: str = "gpt2"
    """Block family: 'gpt2' (LayerNorm, learned positions, GELU, biases: the published experiments) or
    'llama' (RMSNorm, rotary positions, grouped-query attention, SwiGLU dense FFN, no biases; with
    ``moe.activation: swiglu`` and a bias-free router it exports as a stock Mixtral / Qwen3-MoE model)."""
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0
    """Key/value heads (arch 'llama': grouped-query attention; must divide n_head); 0 means n_head."""
    rope_theta: float = 10000.0
    """Rotary base wavelength (arch 'llama')."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (arch 'llama')."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys before the rotation (arch 'llama'; Qwen3's QK-norm)."""
    d_model: int = 128
    d_ff: int = 0
    """Dense FFN hidden width (dense layers and the dense baseline); 0 means 4 x d_model."""
    context: int = 64
    """Tokens per training window (and the attention span)."""
    dropout: float = 0.0
    tie_embeddings: bool = True
    """Share the input embedding and output projection."""
    activation_checkpointing: str = "none"
    """Recompute activations in the backward pass instead of keeping them: 'none', 'moe' (the MoE
    sublayers: S2MoE keeps both pathways' activations, so it has the most to save) or 'all' (whole blocks).
    torch.utils.checkpoint (non-reentrant); random draws (S2MoE's noise) are replayed exactly."""
    moe_layers: str | list[int] = "all"
    """Which FFN blocks are MoE: 'all', 'every_other' (1, 3, ...), 'none' (dense baseline), or a list."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    uniformity: UniformityConfig = field(default_factory=UniformityConfig)
    """An InfoNCE uniformity loss on every FFN's input (off by default; a control for S2MoE's L_u)."""

    def moe_layer_ids(self) -> list[int]:
        if isinstance(self.moe_layers, list):
            return sorted(self.moe_layers)
        return {"all": list(range(self.n_layer)), "every_other": list(range(1, self.n_layer, 2)), "none": []}[
            self.moe_layers
        ]

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    def validate(self, world_size: int | None = None) -> None:
        for name in ("n_layer", "n_head", "d_model", "context"):
            check_positive(f"model.{name}", getattr(self, name))
        check_choice("model.arch", self.arch, ARCHS)
        check_positive("model.n_kv_head", self.n_kv_head, allow_zero=True)
        if self.n_head % self.kv_heads:
            fail("model.n_kv_head", f"must divide model.n_head ({self.n_head}), got {self.n_kv_head}")
        if self.arch == "gpt2":
            for name, plain in (("n_kv_head", self.n_kv_head in (0, self.n_head)), ("qk_norm", not self.qk_norm)):
                if not plain:
                    fail(
                        f"model.{name}",
                        "is an option of model.arch 'llama'; the 'gpt2' block has neither GQA nor QK-norm",
                    )
        else:
            check_positive("model.rope_theta", self.rope_theta)
            check_positive("model.norm_eps", self.norm_eps)
            if (self.d_model // self.n_head) % 2:
                fail(
                    "model.d_model",
                    f"/ model.n_head must be even for rotary positions, got {self.d_model // self.n_head}",
                )
        check_positive("model.vocab_size", self.vocab_size, allow_zero=True)
        check_positive("model.d_ff", self.d_ff, allow_zero=True)
        if self.d_model % self.n_head:
            fail("model.d_model", f"must be divisible by model.n_head ({self.n_head}), got {self.d_model}")
        check_range("model.dropout", self.dropout, 0.0, 1.0)
        check_choice("model.activation_checkpointing", self.activation_checkpointing, ("none", "moe", "all"))
        if isinstance(self.moe_layers, str):
            check_choice("model.moe_layers", self.moe_layers, ("all", "every_other", "none"))
        elif any(not 0 <= i < self.n_layer for i in self.moe_layers):
            fail("model.moe_layers", f"layer indices must be in [0, {self.n_layer}), got {self.moe_layers}")
        elif len(set(self.moe_layers)) != len(self.moe_layers):
            fail("model.moe_layers", f"lists a layer twice: {self.moe_layers}; give each MoE layer once")
        self.moe.validate("model.moe", world_size)
        self.uniformity.validate("model.uniformity")


@dataclass
class DataConfig:
    dataset: str = "pydoc"
    """What ``s2moe prepare`` builds: pydoc (built in), shakespeare, text8, enwik8, wikitext103, text (one
    file, in memory), corpus (streamed: files, folders, globs; .txt, .jsonl, .gz; see docs/data.md)."""
    source: str = ""
    """Raw input: a text file, a dataset archive or folder; '' uses the dataset's default location. For
    corpus: files, folders (recursive) or globs, several separated by commas."""
    data_dir: str = "data_cache/pydoc"
    """Where the prepared token files and meta.json live."""
    tokenizer: str = "char"
    """'char' (characters; bytes for enwik8), 'sentencepiece' (trained on the train split; for corpus on a
    sample), or the path of an existing SentencePiece .model or Hugging Face tokenizer.json (copied into
    data_dir)."""
    vocab_size: int = 8000
    """SentencePiece vocabulary size (when training one)."""
    text_field: str = "text"
    """corpus: the field of each .jsonl line that holds the document text."""
    txt_document: str = "file"
    """corpus: what one document of a .txt file is: 'file' (the whole file) or 'line' (each non-blank line)."""
    eod: bool = True
    """corpus: append the end-of-document token after each document (when the source holds more than one)."""
    eod_token: str = ""
    """A tokenizer file's end-of-document token; '' takes its eos piece (SentencePiece) or the first of
    <|endoftext|>, </s>, <eos> (tokenizer.json)."""
    val_fraction: float = 0.05
    """corpus: expected share of documents in val (whole documents, by a hash of their index)."""
    test_fraction: float = 0.05
    """corpus: expected share of documents in test (0: no test split)."""
    workers: int = 0
    """corpus: tokenisation processes; 0 means one per available core."""
    tokenizer_sample_mb: int = 100
    """corpus with tokenizer=sentencepiece: MB of text (spread over the corpus) to train it on."""

    def validate(self) -> None:
        from .data.datasets import DATASETS

        check_choice("data.dataset", self.dataset, DATASETS)
        if self.tokenizer not in ("char", "sentencepiece") and not self.tokenizer.endswith(
            (".model", "tokenizer.json")
        ):
            fail(
                "data.tokenizer",
                f"got {self.tokenizer!r}; valid values: 'char', 'sentencepiece', or the path of "
                f"a SentencePiece .model file or a Hugging Face tokenizer.json",
            )
        check_positive("data.vocab_size", self.vocab_size)
        if not self.text_field:
            fail("data.text_field", "must name the .jsonl field holding the text, e.g. 'text'")
        check_choice("data.txt_document", self.txt_document, ("file", "line"))
        if not 0.0 < self.val_fraction < 1.0:
            fail("data.val_fraction", f"must be in (0, 1) (training evaluates on val), got {self.val_fraction!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            fail("data.test_fraction", f"must be in [0, 1), got {self.test_fraction!r}")
        if self.val_fraction + self.test_fraction >= 1.0:
            fail(
                "data.val_fraction",
                f"plus data.test_fraction must be below 1 (train takes the rest), got "
                f"{self.val_fraction} + {self.test_fraction}",
            )
        check_positive("data.workers", self.workers, allow_zero=True)
        check_positive("data.tokenizer_sample_mb", self.tokenizer_sample_mb)

    def check_tokenizer_file(self) -> None:
        """At prepare time: a tokenizer file named in data.tokenizer must exist (train/eval read the copy
        kept in data_dir, so this is not part of ``validate``)."""
        if self.tokenizer not in ("char", "sentencepiece") and not Path(self.tokenizer).expanduser().is_file():
            fail(
                "data.tokenizer",
                f"file {self.tokenizer!r} does not exist; give the path of an existing "
                f"SentencePiece .model file or Hugging Face tokenizer.json (relative paths start "
                f"at {Path.cwd()}), or 'char' / 'sentencepiece'",
            )


@dataclass
class TrainConfig:
    steps: int = 200
    """Optimizer steps (the length of the learning-rate schedule)."""
    stop_at_step: int = 0
    """Save and exit once this step is reached, as a time-limited or pre-empted job would, so a later
    ``train.resume=auto`` continues the same schedule; 0 runs to ``steps``."""
    micro_batch_size: int = 12
    """Windows per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 1e-3
    min_lr: float = 1e-4
    """Learning rate at the end of the schedule."""
    lr_schedule: str = "cosine"
    """After the linear warm-up: 'cosine' (decay to min_lr), 'linear', or 'wsd' (constant, then a linear
    decay over the last ``decay_fraction`` of the steps); see s2moe_ds/schedule.py."""
    decay_fraction: float = 0.2
    """'wsd' only: the share of ``steps`` spent decaying to min_lr."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    optimizer_impl: str = "fused"
    """AdamW's kernel: 'fused' (one pass over each tensor: ~3x faster than 'for_loop' on CPU, the same
    update up to rounding), 'foreach' or 'for_loop' (torch's per-parameter loop; the default before
    2026-12-02). The math is the same (torch.optim.AdamW)."""
    seed: int = 1337
    eval_interval: int = 100
    """Evaluate on the validation split every this many steps (and at the end)."""
    eval_iters: int = 20
    """Validation batches per evaluation during training."""
    log_interval: int = 10
    save_interval: int = 100
    """Checkpoint every this many steps (and at the end); 0 saves only at the end."""
    out_dir: str = "runs/default"
    """Run directory: checkpoints/, tensorboard/, metrics.jsonl, config.yaml."""
    ds_config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON config (ZeRO stage, offload); batch, clipping and precision are filled in from here."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (on a CPU without bf16 matrix units use fp32: docs/benchmarks.md)."""
    resume: str = ""
    """'' starts fresh (refusing to overwrite a run that has checkpoints); 'auto' resumes the latest
    checkpoint in out_dir; or a checkpoint directory/tag path."""
    init_from: str = ""
    """Fine-tuning: start from another run's weights (a run directory, a checkpoint, an exported folder);
    the optimizer, schedule and step start fresh, in any parallel layout. Another vocabulary or
    architecture is refused. A run that resumes its own checkpoint ignores it."""
    max_skipped_steps: int = 10
    """With ZeRO 1/2 a step whose loss or gradient is not finite is skipped (and counted in
    TensorBoard as train/skipped_steps); this many skips in a row stop the run with a checkpoint of the
    last good state. ZeRO 0 cannot skip: a non-finite loss stops the run at once."""
    keep_last: int = 0
    """Keep only the newest N verified checkpoints (0 keeps all); the newest valid one is never deleted."""
    portable_checkpoints: bool = True
    """Also write each checkpoint's full fp32 weights and Adam moments per parameter (per global expert),
    so a run can resume under a different ep_size / world size / ZeRO stage (see s2moe_ds/checkpoint/portable.py)."""
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 sends its numbers besides metrics.jsonl: any of 'tensorboard', 'csv' (metrics.csv),
    'wandb' (needs ``pip install wandb``; WANDB_MODE=offline works without an account)."""
    wandb_project: str = "s2moe"
    """W&B project (tracker 'wandb')."""
    wandb_entity: str = ""
    """W&B entity (team or user); '' uses the account's default."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one device for the MFU in the progress line; 0 looks it up (GPU table) or
    estimates it (CPU: threads x clock x vector width)."""
    progress: bool = True
    """A tqdm bar on rank 0 when stderr is a terminal (the progress line is printed in every case)."""
    dist_timeout_s: int = 600
    """Process-group timeout: a rank waiting on a dead peer fails after this long instead of hanging."""

    def validate(self) -> None:
        for name in (
            "steps",
            "micro_batch_size",
            "grad_accum",
            "lr",
            "eval_interval",
            "eval_iters",
            "log_interval",
            "dist_timeout_s",
        ):
            check_positive(f"train.{name}", getattr(self, name))
        for name in (
            "min_lr",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "save_interval",
            "stop_at_step",
            "keep_last",
            "max_skipped_steps",
        ):
            check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                fail(f"train.{name}", f"must be in [0, 1) (Adam's moment decay; 1 never forgets), got {value!r}")
        if self.lr > 1.0:
            fail("train.lr", f"must be at most 1 (AdamW moves every weight by about lr per step), got {self.lr!r}")
        if self.min_lr > self.lr:
            fail("train.min_lr", f"must not exceed train.lr ({self.lr}), got {self.min_lr!r}")
        if not self.out_dir.strip():
            fail("train.out_dir", "is empty; give the run's directory (an empty one would train into the current one)")
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        check_choice("train.lr_schedule", self.lr_schedule, SCHEDULES)
        for i, name in enumerate(self.trackers):
            check_choice(f"train.trackers[{i}]", name, TRACKERS)
        if len(set(self.trackers)) != len(self.trackers):
            fail("train.trackers", f"lists a tracker twice: {self.trackers}")
        check_positive("train.peak_tflops", self.peak_tflops, allow_zero=True)
        check_range("train.decay_fraction", self.decay_fraction, 0.0, 1.0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return to_dict(self)


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Every rule of the config tree, each checked in one place, raising a ``ConfigError`` that names the
    field, the bad value and what would be right. Called at load; called again with ``world_size`` where
    the world size becomes known (the trainer), which adds the rules that need it (``model.moe.ep_size``
    must divide it)."""
    cfg.model.validate(world_size)
    cfg.data.validate()
    cfg.train.validate()
    return cfg


def read_config_file(path: str | Path) -> dict:
    path = resolve_path(path, CONFIG_DIR)
    if not path.exists():
        shipped = ", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {str(path)!r} does not exist (the shipped configs, by name: {shipped})")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; give a YAML or JSON file")
    text = path.read_text()
    if not text.strip():
        raise ConfigError(
            f"config file {str(path)!r} is empty; give a file with model/data/train sections, or leave --config "
            f"out to train the built-in defaults"
        )
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text, f"config file {str(path)!r}")
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(
            f"config file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections (model, data, train)")
    return data


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    data = read_config_file(path) if path else {}
    data = apply_overrides(data, overrides)
    return validate(from_dict(Config, data))


def config_from_dict(data: dict) -> Config:
    return validate(from_dict(Config, data))


def model_config_from_dict(data: dict, prefix: str = "model") -> ModelConfig:
    """The model section alone (an exported folder's ``config.json``), checked as ``validate`` checks it."""
    cfg = from_dict(ModelConfig, data, prefix=prefix)
    cfg.validate()
    return cfg


def resolve_path(path: str | Path, folder: Path = CONFIG_DIR) -> Path:
    """A config file from any working directory: the path as given when it exists; else the shipped copy
    (``configs/tiny.yaml`` and ``ds_configs/zero2.json``, as the configs name them, are package data), or
    a bare name in ``folder`` (``tiny`` -> ``configs/tiny.yaml``, ``zero2`` -> ``ds_configs/zero2.json``).
    A path found nowhere comes back as given, for the caller's error message."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    candidates = [PACKAGE_DIR / p] if p.parts[0] in ("configs", "ds_configs") else []
    if p.parent == Path("."):
        candidates += [folder / p.name] + [folder / (p.name + s) for s in (".yaml", ".yml", ".json")]
    return next((c for c in candidates if c.is_file()), p)
