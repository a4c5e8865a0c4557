"""The typed configuration schema: one dataclass per config group.

Hydra merges `configs/default_config.yaml` (and the `model/`, `training/` groups)
onto these dataclasses, so a misspelt key or a wrong type is rejected by OmegaConf
before anything is built.  `validate()` adds the range and cross-field checks that
types alone cannot express.  Every error names the offending key.

Each group maps onto one package folder (see README "Architecture"):
  model -> vishwamai/model, data -> vishwamai/data, training/amp -> vishwamai/train,
  checkpointing -> vishwamai/checkpoint, monitoring -> vishwamai/monitoring,
  distributed -> vishwamai/distributed, dynamic_batch_size -> vishwamai/batching,
  distillation -> vishwamai/distill (+ pruning/quantization -> vishwamai/compress),
  tuning -> vishwamai/tune.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Optional, Sequence

from omegaconf import MISSING, DictConfig

from vishwamai.errors import ConfigError, NotImplementedYet


# --------------------------------------------------------------------------- model
@dataclass
class RopeScalingConfig:
    # null = plain RoPE. "llama3": Llama 3.1+'s long-context RoPE (Hugging Face rope_type "llama3", the one
    # variant implemented; imported Llama 3.1/3.2/3.3 models carry it): rotary frequencies whose wavelength
    # exceeds original_max_seq_len / low_freq_factor are divided by `factor`, those under
    # original_max_seq_len / high_freq_factor are kept, and the band between is blended.
    type: Optional[str] = None
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 257
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    # Key/value heads for grouped-query attention; null = n_heads (plain multi-head).
    n_kv_heads: Optional[int] = None
    # Hidden width of the SwiGLU MLP; null = 8/3 * d_model rounded up to a multiple of 64.
    ffn_hidden: Optional[int] = None
    max_seq_len: int = 256
    dropout_rate: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    # Biases on the query/key/value projections (Qwen2-family models have them).
    qkv_bias: bool = False
    init_std: float = 0.02
    # Shard-group size for model_parallel (hybrid sharding), see distributed/.
    parallel_factor: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):  # read back from model_config.json / a plain container
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)


# ---------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    # null = the embedded corpus (built from Python's standard-library sources,
    # present on every machine that runs vishwamai). Else a text file, a folder
    # of .txt/.md/.py files, or a .jsonl file with a "text" field per line.
    path: Optional[str] = None
    # "byte" (256 byte values + end-of-document) or the path of a tokenizer.json.
    tokenizer: str = "byte"
    seq_len: int = 256
    val_fraction: float = 0.05
    # Where tokenized corpora (tokens.bin) are cached; null = ~/.cache/vishwamai/data.
    cache_dir: Optional[str] = None
    # Cap on the embedded corpus, in bytes.
    embedded_max_bytes: int = 3_000_000
    # Steps of training windows read ahead by a background thread while the current step runs
    # (pinned memory on CUDA); 0 = read in the loop. Resume stays exact (vishwamai/data/prefetch.py).
    prefetch: int = 1


# ------------------------------------------------------------------------ training
@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | constant
    warmup_steps: int = 100
    # Final lr as a fraction of the peak lr.
    min_lr_ratio: float = 0.1


@dataclass
class TrainingConfig:
    max_steps: int = 1000
    # Micro-batch size per process; one optimizer step sees
    # batch_size * gradient_accumulation_steps * world_size sequences.
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    grad_clip: float = 1.0
    seed: int = 1337
    log_every_n_steps: int = 10
    eval_every_n_steps: int = 100
    eval_batches: int = 20
    # null = no resume; "auto" = newest valid checkpoint in the run dir; or a path.
    resume: Optional[str] = None
    # A run dir that already holds checkpoints is refused unless resumed or overwritten:
    # true removes the earlier run's checkpoints, metrics and reports first.
    overwrite: bool = False
    # Start from the weights of another model (a run dir or a checkpoint dir): its
    # architecture replaces `model` (fine-tuning, pruning or distilling a pretrained model).
    init_from: Optional[str] = None
    compile: bool = False
    # torch.compile's mode. On 2 CPU cores (tiny model) max-autotune-no-cudagraphs measured 1.15x over
    # eager vs 1.08x for default; it compiles for longer. reduce-overhead / max-autotune: CUDA graphs.
    compile_mode: str = "default"
    # Cross-entropy a block of this many tokens at a time, fused with the lm_head projection, so the
    # (tokens x vocab) float32 logits never exist whole (train/loss.py). 0 = off (the whole logits).
    # A memory lever for large vocabularies without compile (32k vocab, 8x256: step memory 0.48x);
    # under training.compile inductor already fuses the whole loss, and that is faster on CPU.
    loss_chunk_rows: int = 0
    # Recompute each transformer block's activations in the backward instead of keeping them
    # (torch.utils.checkpoint per block): less memory for about one more forward, the same losses.
    activation_checkpointing: bool = False
    # Intra-op CPU threads; null = torch's default.
    num_threads: Optional[int] = None
    # cpu | cuda | auto
    device: str = "auto"
    progress_bar: bool = True
    # Stop after this many consecutive non-finite steps (a NaN/inf loss or gradient, or an
    # fp16 step the loss scaler skipped because its gradients overflowed).
    max_consecutive_bad_steps: int = 5
    # Warn when the gradient norm has been exactly zero this many steps in a row (nothing trains).
    zero_grad_warn_steps: int = 3
    # At the end of the run, print a short sample the model generates from this prompt and put
    # it into the run report (null = no sample).
    sample_prompt: Optional[str] = None
    sample_tokens: int = 120
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


# ----------------------------------------------------------------------------- amp
@dataclass
class LossScaleConfig:
    # The float16 GradScaler (dynamic loss scaling). bfloat16 has float32's range and needs
    # none: with bfloat16 `enabled` is accepted and has no effect (the run log says so).
    enabled: bool = True
    init_scale: float = 65536.0
    growth_interval: int = 2000


@dataclass
class AmpConfig:
    enabled: bool = False
    dtype: str = "bfloat16"  # bfloat16 | float16
    # O1: autocast - weights and optimizer state stay fp32, matmuls run in `dtype`.
    # O2: the model's weights in `dtype`, float32 master weights kept by the optimizer
    # (norm gains, the loss and the master update stay float32) - train/precision.py.
    opt_level: str = "O1"
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)


# --------------------------------------------------------------------- checkpoints
@dataclass
class CheckpointingConfig:
    # 0 = only the final checkpoint.
    every_n_steps: int = 0
    save_optimizer_state: bool = True
    keep_last_n: int = 5
    save_best: bool = True
    metric: str = "validation_loss"
    mode: str = "min"
    save_zero_redundancy: bool = False


# torch.compile(mode=...) values; "default" passes no mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------------- monitoring
@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "vishwamai"


@dataclass
class TensorboardConfig:
    enabled: bool = True


@dataclass
class MlflowConfig:
    enabled: bool = True
    # null = $MLFLOW_TRACKING_URI when set (a tracking server on a cluster; MLflow reads its
    # credentials from MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN), else sqlite:///RUN_DIR/mlflow.db
    tracking_uri: Optional[str] = None
    experiment: str = "vishwamai"
    # At the end of the run, wait at most this long for the MLflow child to send what is left;
    # after that it is stopped and the run dir says how to upload the rest (nothing is lost).
    close_timeout_s: float = 60.0


@dataclass
class MonitoringConfig:
    enabled: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    # Parameter/gradient histograms every N steps (0 = never).
    histogram_every_n_steps: int = 0
    # torch.profiler trace of steps [profile_start, profile_start + profile_steps).
    profile: bool = False
    profile_start: int = 5
    profile_steps: int = 3
    # Peak FLOP/s of one device for MFU; null = from a table of known GPUs (CPU: MFU not reported).
    peak_flops_per_s: Optional[float] = None
    # Write RUN_DIR/report.png and report.md at the end of the run (vishwamai/report.py).
    report: bool = True


# ------------------------------------------------------------------ dynamic batch
@dataclass
class DynamicBatchConfig:
    enabled: bool = False
    initial_batch_size: int = 32
    target_batch_size: int = 128
    min_batch_size: int = 8
    growth_factor: float = 2.0
    shrink_factor: float = 0.5
    stable_steps: int = 100
    # Keep the global batch constant by trading micro-batch for accumulation (the sizes above are
    # then micro-batch sizes, at most training.batch_size * gradient_accumulation_steps).
    # Default false: the batch itself grows and shrinks (vishwamai/batching).
    constant_global_batch: bool = False
    # none | linear | sqrt: lr follows batch_size / initial_batch_size (plain mode only).
    lr_scaling: str = "none"
    # Skip the update and shrink when the grad norm exceeds this x the running median; 0 = off.
    grad_spike_factor: float = 10.0


# ---------------------------------------------------------------------- distributed
@dataclass
class DistributedConfig:
    # none | data_parallel | model_parallel
    strategy: str = "none"
    # null = auto: nccl on GPU, gloo on CPU.
    backend: Optional[str] = None
    world_size: Optional[int] = None
    node_rank: int = 0
    nproc_per_node: Optional[int] = None
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    bucket_cap_mb: float = 25.0
    bf16_grad_compression: bool = False
    zero_optimizer: bool = False
    # Seconds a collective may wait for a peer before the rank fails (no endless hang).
    timeout_s: int = 300
    # Restarts of the whole process group after a failure (vishwamai's own launcher;
    # with torchrun use --max-restarts). Pair with training.resume=auto.
    max_restarts: int = 0


# --------------------------------------------------------------------- distillation
@dataclass
class TeacherConfig:
    # A run directory (its best, else latest, else final checkpoint) or one checkpoint directory.
    path: Optional[str] = None
    # Several teachers for an ensemble (path, if set, comes first): their softened distributions
    # are averaged, weighted by `weights` (empty = equal weights).
    paths: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    temperature: float = 2.0
    # loss = (1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student).
    alpha: float = 0.5
    dtype: str = "float32"  # float32 | bfloat16
    # Sequence positions per chunk of the KL (only one chunk's softmax is held at a time).
    kd_chunk_size: int = 128


@dataclass
class FeatureDistillationConfig:
    enabled: bool = False
    # Student blocks (0-based) whose outputs are matched to the teacher's.
    layers: list[int] = field(default_factory=lambda: [0])
    # The teacher block for each of `layers`; null = uniform depth mapping (see vishwamai/distill).
    teacher_layers: Optional[list[int]] = None
    loss_weight: float = 0.1
    loss: str = "mse"  # mse | cosine
    # MSE of RMS-normalised hidden states (scale-free); false = raw MSE.
    normalize: bool = True


@dataclass
class AttentionDistillationConfig:
    enabled: bool = False
    # Student blocks whose attention maps are matched (null = all), teacher blocks by uniform mapping.
    layers: Optional[list[int]] = None
    loss_weight: float = 0.1
    loss: str = "kl"  # kl | mse


@dataclass
class HiddenDistillationConfig:
    enabled: bool = False
    loss_weight: float = 0.1
    loss: str = "mse"  # mse | cosine
    normalize: bool = True  # as feature_distillation.normalize


@dataclass
class EmbeddingDistillationConfig:
    # Cosine similarity between the embedding outputs (hidden_states[0]).
    enabled: bool = False
    loss_weight: float = 0.1


@dataclass
class PruningConfig:
    enabled: bool = False
    target_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    pruning_schedule: str = "cubic"  # cubic | linear | constant
    begin_step: int = 1000
    end_step: int = 10000
    # Masks are recomputed every `frequency` steps between begin_step and end_step (and at end_step).
    frequency: int = 10
    # unstructured (single weights) | structured (whole units, see structured_targets)
    method: str = "unstructured"
    scope: str = "per_layer"  # per_layer | global (one threshold over all prunable layers)
    # Units structured pruning removes: mlp (SwiGLU channels) and/or heads (attention heads).
    structured_targets: list[str] = field(default_factory=lambda: ["mlp"])
    # Parameters whose name contains one of these are never pruned (embeddings, output head, norms).
    exclude: list[str] = field(default_factory=lambda: ["embed", "lm_head", "norm"])


@dataclass
class QuantizationConfig:
    enabled: bool = False
    precision: str = "int8"
    # dynamic (int8 activations at run time) | weight_only (int8 weights, activations not quantized)
    mode: str = "dynamic"
    calibration_steps: int = 100


@dataclass
class DistillationConfig:
    enabled: bool = False
    teacher_model: TeacherConfig = field(default_factory=TeacherConfig)
    feature_distillation: FeatureDistillationConfig = field(default_factory=FeatureDistillationConfig)
    attention_distillation: AttentionDistillationConfig = field(default_factory=AttentionDistillationConfig)
    hidden_distillation: HiddenDistillationConfig = field(default_factory=HiddenDistillationConfig)
    embedding_distillation: EmbeddingDistillationConfig = field(default_factory=EmbeddingDistillationConfig)
    # random | teacher_layers: the student (same width as the teacher, model.n_layers blocks) starts
    # from evenly spaced teacher blocks plus its embeddings, final norm and head (DistilBERT's recipe).
    student_init: str = "random"
    # The seed nests compression here; it also runs without distillation.enabled.
    pruning: PruningConfig = field(default_factory=PruningConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


# --------------------------------------------------------------------------- tuning
@dataclass
class PbtConfig:
    """Population-based training (tuning.pruner=pbt, Ray only): every perturbation_interval steps a
    trial in the bottom quantile continues from a top trial's checkpoint with perturbed values of the
    searched keys PBT may change (lr, weight decay, dropout; see vishwamai/tune/pbt.py)."""

    # Steps between checkpoints / exploit decisions; a multiple of training.eval_every_n_steps.
    perturbation_interval: int = 100
    quantile_fraction: float = 0.25
    # Chance that an exploited value is resampled from the space instead of scaled by 0.8 / 1.2.
    resample_probability: float = 0.25
    # true: every trial waits at each perturbation point for the whole population (decisions compare
    # all trials; paused trials restart from their checkpoint); false: each trial is compared with
    # those that have reported so far (no waiting).
    synch: bool = False


@dataclass
class TuningConfig:
    enabled: bool = False
    framework: str = "optuna"  # optuna | ray
    num_trials: int = 20
    metric: str = "validation_loss"
    direction: str = "minimize"
    sampler: str = "tpe"  # tpe | random | cmaes | grid (| bohb with framework=ray)
    pruner: str = "median"  # median | hyperband | successive_halving | none (| pbt with framework=ray)
    # Trials that always run to the end before the pruner may stop one, and the
    # steps of every trial before it may be pruned.
    pruner_startup_trials: int = 5
    pruner_warmup_steps: int = 0
    # null = a random seed for the sampler.
    sampler_seed: Optional[int] = None
    # null = sqlite:///RUN_DIR/optuna.db; any SQLAlchemy URL (postgresql://, mysql://).
    storage: Optional[str] = None
    study_name: str = "vishwamai"
    # Trials run at once: Optuna starts n_jobs-1 extra worker processes on the same
    # storage; Ray runs n_jobs concurrent trials.
    n_jobs: int = 1
    # Stop starting trials after this many seconds (null = no limit).
    timeout_s: Optional[float] = None
    # Seconds between a running trial's heartbeats; a trial silent for 3x this long
    # (its process died) is marked failed and retried once. 0 = off.
    heartbeat_s: int = 60
    # key -> {type: float|log_float|int|categorical, low, high, step, choices};
    # a null spec drops a key of the default space.
    search_space: dict[str, Any] = field(default_factory=dict)
    # Parameter sets tried first when the study is created (e.g. the current best guess).
    enqueue_trials: list[dict[str, Any]] = field(default_factory=list)
    # Print `validation_loss=<value>` lines at each evaluation for Katib's StdOut collector.
    katib_stdout: bool = False
    # Ray Tune: resources per trial; null address = a local Ray instance.
    ray_address: Optional[str] = None
    ray_cpus_per_trial: float = 1.0
    ray_gpus_per_trial: float = 0.0
    pbt: PbtConfig = field(default_factory=PbtConfig)


# -------------------------------------------------------------------------- root
@dataclass
class VishwamaiConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    amp: AmpConfig = field(default_factory=AmpConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    dynamic_batch_size: DynamicBatchConfig = field(default_factory=DynamicBatchConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    # Where the run writes; training_v2 sets it to Hydra's run dir.
    run_dir: str = MISSING


def register_schema() -> None:
    """Register the schema with Hydra's ConfigStore (used by default_config.yaml)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=VishwamaiConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="training", name="base_training", node=TrainingConfig)


def compose_config(overrides: Sequence[str] = (), run_dir: Optional[str] = None) -> DictConfig:
    """The config `python -m vishwamai.training_v2 *overrides` would get, for Python callers."""
    from hydra import compose, initialize_config_module

    register_schema()
    with initialize_config_module("vishwamai.configs", version_base="1.3"):
        cfg = compose("default_config", overrides=list(overrides) + ([f"run_dir={run_dir}"] if run_dir else []))
    return cfg


# ---------------------------------------------------------------------- validation
def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _one_of(value: Any, key: str, choices: tuple) -> None:
    _check(value in choices, key, f"got {value!r}, expected one of {list(choices)}")


def _validate_rope_scaling(r: RopeScalingConfig) -> None:
    if r.type != "llama3":
        raise NotImplementedYet(f"model.rope_scaling.type={r.type!r}", "only 'llama3' rope scaling is implemented")
    _check(r.factor >= 1.0, "model.rope_scaling.factor", f"must be >= 1, got {r.factor}")
    _check(0 < r.low_freq_factor < r.high_freq_factor, "model.rope_scaling.low_freq_factor",
           f"need 0 < low_freq_factor < high_freq_factor, got {r.low_freq_factor} and {r.high_freq_factor}")
    _check(r.original_max_seq_len > 0, "model.rope_scaling.original_max_seq_len",
           f"must be > 0, got {r.original_max_seq_len}")


# Float-typed schema fields; the lists are checked element by element.
_FLOAT_HINTS = (float, Optional[float])
_FLOAT_LIST_HINTS = (list[float], Optional[list[float]])


def check_finite(cfg: Any, schema: type = VishwamaiConfig, prefix: str = "") -> None:
    """Every float of the schema is finite: OmegaConf accepts nan and inf for a float, and a
    range check such as `lr > 0` lets inf through (one update with lr=inf ruins the weights).
    Driven by the dataclasses, so a float key added to any group is covered without a line here."""
    for name, hint in typing.get_type_hints(schema).items():
        value, key = getattr(cfg, name), prefix + name
        if is_dataclass(hint):
            check_finite(value, hint, key + ".")
        elif value is not None and hint in _FLOAT_HINTS + _FLOAT_LIST_HINTS:
            values = list(value) if hint in _FLOAT_LIST_HINTS else [value]
            _check(all(math.isfinite(v) for v in values), key, f"must be a finite number, got {value}")


def validate(cfg: DictConfig | VishwamaiConfig) -> None:
    """Range and cross-field checks. Raises ConfigError naming the key (NotImplementedYet for a
    combination this build does not support yet)."""
    check_finite(cfg)
    m, d, t = cfg.model, cfg.data, cfg.training
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "parallel_factor"):
        _check(getattr(m, key) > 0, f"model.{key}", f"must be > 0, got {getattr(m, key)}")
    _check(m.d_model % m.n_heads == 0, "model.n_heads",
           f"model.d_model={m.d_model} must be divisible by n_heads={m.n_heads}")
    _check((m.d_model // m.n_heads) % 2 == 0, "model.n_heads", "head dim must be even for rotary embeddings")
    if m.n_kv_heads is not None:
        _check(m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
               f"must divide n_heads={m.n_heads}, got {m.n_kv_heads}")
    _check(0.0 <= m.dropout_rate < 1.0, "model.dropout_rate", f"must be in [0, 1), got {m.dropout_rate}")
    _check(m.rope_theta > 0, "model.rope_theta", f"must be > 0, got {m.rope_theta}")
    if m.rope_scaling.type is not None:
        _validate_rope_scaling(m.rope_scaling)
    _check(m.norm_eps > 0, "model.norm_eps", f"must be > 0, got {m.norm_eps}")

    _check(d.seq_len > 0, "data.seq_len", f"must be > 0, got {d.seq_len}")
    _check(d.seq_len <= m.max_seq_len, "data.seq_len",
           f"{d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    _check(0.0 < d.val_fraction < 0.5, "data.val_fraction", f"must be in (0, 0.5), got {d.val_fraction}")
    _check(0 <= d.prefetch <= 16, "data.prefetch", f"must be in [0, 16] (steps read ahead; 0 = off), got {d.prefetch}")

    _check(t.max_steps > 0, "training.max_steps", f"must be > 0, got {t.max_steps}")
    _check(t.batch_size > 0, "training.batch_size", f"must be > 0, got {t.batch_size}")
    _check(t.gradient_accumulation_steps > 0, "training.gradient_accumulation_steps", "must be > 0")
    _check(t.log_every_n_steps > 0, "training.log_every_n_steps", "must be > 0")
    _check(t.eval_every_n_steps >= 0, "training.eval_every_n_steps", "must be >= 0 (0 = only at the end)")
    _check(t.eval_batches > 0, "training.eval_batches", "must be > 0")
    _check(t.grad_clip >= 0, "training.grad_clip", "must be >= 0 (0 = no clipping)")
    _check(t.max_consecutive_bad_steps > 0, "training.max_consecutive_bad_steps", "must be > 0")
    _check(t.zero_grad_warn_steps > 0, "training.zero_grad_warn_steps", "must be > 0")
    _check(t.sample_tokens > 0, "training.sample_tokens", "must be > 0")
    _one_of(t.device, "training.device", ("auto", "cpu", "cuda"))
    _one_of(t.compile_mode, "training.compile_mode", COMPILE_MODES)
    _check(t.compile or t.compile_mode == "default", "training.compile_mode",
           f"{t.compile_mode!r} has no effect without training.compile=true")
    _check(t.loss_chunk_rows >= 0, "training.loss_chunk_rows", f"must be >= 0 (0 = off), got {t.loss_chunk_rows}")
    if t.loss_chunk_rows:
        _check(not cfg.distillation.enabled, "training.loss_chunk_rows",
               "distillation reads the student's logits, which the chunked loss never makes whole: set it to 0")
        if cfg.distributed.strategy == "model_parallel":  # lm_head's weight is a shard outside the forward
            raise NotImplementedYet("training.loss_chunk_rows with distributed.strategy=model_parallel")
    o = t.optimizer
    _one_of(o.name, "training.optimizer.name", ("adamw",))
    _check(o.lr > 0, "training.optimizer.lr", f"must be > 0, got {o.lr}")
    _check(o.weight_decay >= 0, "training.optimizer.weight_decay", "must be >= 0")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "training.optimizer.beta1", "betas must be in [0, 1)")
    s = t.scheduler
    _one_of(s.name, "training.scheduler.name", ("cosine", "constant"))
    _check(s.warmup_steps >= 0, "training.scheduler.warmup_steps", "must be >= 0")
    _check(0 <= s.min_lr_ratio <= 1, "training.scheduler.min_lr_ratio", "must be in [0, 1]")

    a = cfg.amp
    _one_of(a.dtype, "amp.dtype", ("bfloat16", "float16"))
    _one_of(a.opt_level, "amp.opt_level", ("O1", "O2"))
    # A GradScaler scale outside [1, 2^24] either overflows fp16 (max 65504) on the first
    # backward of every step, or barely scales at all: both mean an fp16 run that never trains.
    _check(1.0 <= a.loss_scale.init_scale <= 2.0 ** 24, "amp.loss_scale.init_scale",
           f"must be in [1, 2^24 = 16777216] (a power of two such as 65536), got {a.loss_scale.init_scale}")
    _check(a.loss_scale.growth_interval > 0, "amp.loss_scale.growth_interval", "must be > 0")

    c = cfg.checkpointing
    _check(c.every_n_steps >= 0, "checkpointing.every_n_steps", "must be >= 0")
    _check(c.keep_last_n >= 1, "checkpointing.keep_last_n", "must be >= 1")
    _one_of(c.mode, "checkpointing.mode", ("min", "max"))
    _one_of(c.metric, "checkpointing.metric", ("validation_loss", "train_loss"))

    b = cfg.dynamic_batch_size
    if b.enabled:
        _check(b.min_batch_size > 0, "dynamic_batch_size.min_batch_size", "must be > 0")
        _check(b.min_batch_size <= b.initial_batch_size, "dynamic_batch_size.min_batch_size",
               f"min_batch_size={b.min_batch_size} exceeds initial_batch_size={b.initial_batch_size}")
        _check(b.min_batch_size <= b.target_batch_size, "dynamic_batch_size.min_batch_size",
               f"min_batch_size={b.min_batch_size} exceeds target_batch_size={b.target_batch_size}")
        _check(b.initial_batch_size <= b.target_batch_size, "dynamic_batch_size.initial_batch_size",
               f"initial_batch_size={b.initial_batch_size} exceeds target_batch_size={b.target_batch_size}")
        _check(b.growth_factor > 1, "dynamic_batch_size.growth_factor", "must be > 1")
        _check(0 < b.shrink_factor < 1, "dynamic_batch_size.shrink_factor", "must be in (0, 1)")
        _check(b.stable_steps > 0, "dynamic_batch_size.stable_steps", "must be > 0")
        _one_of(b.lr_scaling, "dynamic_batch_size.lr_scaling", ("none", "linear", "sqrt"))
        _check(b.grad_spike_factor == 0 or b.grad_spike_factor > 1, "dynamic_batch_size.grad_spike_factor",
               f"must be > 1 (or 0 to turn spike detection off), got {b.grad_spike_factor}")
        if b.constant_global_batch:
            step_batch = cfg.training.batch_size * cfg.training.gradient_accumulation_steps
            _check(b.target_batch_size <= step_batch, "dynamic_batch_size.target_batch_size",
                   f"{b.target_batch_size} is a micro-batch size with constant_global_batch=true and cannot "
                   f"exceed the step's batch (training.batch_size x gradient_accumulation_steps = {step_batch})")
            _check(b.lr_scaling == "none", "dynamic_batch_size.lr_scaling",
                   f"{b.lr_scaling!r} has no effect with constant_global_batch=true (the batch does not change)")

    _validate_distributed(cfg)
    _validate_monitoring(cfg)

    ds = cfg.distillation
    _check(ds.teacher_model.temperature > 0, "distillation.teacher_model.temperature", "must be > 0")
    _check(0 <= ds.teacher_model.alpha <= 1, "distillation.teacher_model.alpha", "must be in [0, 1]")
    if ds.enabled:
        _validate_distillation(ds)
    _check(ds.student_init == "random" or ds.enabled, "distillation.student_init",
           f"{ds.student_init!r} initialises the student from the teacher: needs distillation.enabled=true")
    _check(ds.student_init == "random" or cfg.distributed.strategy != "model_parallel", "distillation.student_init",
           f"{ds.student_init!r} is not supported with distributed.strategy=model_parallel (sharded student)")
    p = ds.pruning
    if p.enabled:
        _check(0 <= p.target_sparsity < 1, "distillation.pruning.target_sparsity", "must be in [0, 1)")
        _check(0 <= p.initial_sparsity <= p.target_sparsity, "distillation.pruning.initial_sparsity",
               "must be in [0, target_sparsity]")
        _one_of(p.pruning_schedule, "distillation.pruning.pruning_schedule", ("cubic", "linear", "constant"))
        _check(0 <= p.begin_step <= p.end_step, "distillation.pruning.begin_step",
               f"begin_step={p.begin_step} must be <= end_step={p.end_step}")
        _check(p.frequency > 0, "distillation.pruning.frequency", f"must be > 0, got {p.frequency}")
        _one_of(p.method, "distillation.pruning.method", ("unstructured", "structured"))
        _one_of(p.scope, "distillation.pruning.scope", ("per_layer", "global"))
        for unit in p.structured_targets:
            _one_of(unit, "distillation.pruning.structured_targets", ("mlp", "heads"))
        _check(p.method != "structured" or len(p.structured_targets) > 0, "distillation.pruning.structured_targets",
               "must name at least one of mlp, heads with method=structured")
        if cfg.amp.enabled and cfg.amp.opt_level == "O2":
            # Pruning masks the model's weights after each step; under O2 the float32 masters would
            # bring the pruned weights back at the next update.
            raise NotImplementedYet("amp.opt_level=O2 with distillation.pruning.enabled=true (use amp.opt_level=O1)")
    q = ds.quantization
    if q.enabled:
        _check(q.precision == "int8", "distillation.quantization.precision",
               f"{q.precision!r} is not supported on this build; supported: ['int8']")
        _check(q.calibration_steps >= 0, "distillation.quantization.calibration_steps",
               "must be >= 0 (0 = plain absmax scales)")
        _one_of(q.mode, "distillation.quantization.mode", ("dynamic", "weight_only"))

    tu = cfg.tuning
    _one_of(tu.framework, "tuning.framework", ("optuna", "ray"))
    _check(tu.num_trials > 0, "tuning.num_trials", "must be > 0")
    _one_of(tu.direction, "tuning.direction", ("minimize", "maximize"))
    _one_of(tu.metric, "tuning.metric", ("validation_loss", "validation_perplexity"))
    _one_of(tu.sampler, "tuning.sampler", ("tpe", "random", "cmaes", "grid", "bohb"))
    _check(tu.sampler != "bohb" or tu.framework == "ray", "tuning.sampler", "bohb needs tuning.framework=ray")
    _one_of(tu.pruner, "tuning.pruner", ("median", "hyperband", "successive_halving", "none", "pbt"))
    if tu.pruner == "pbt":
        _check(tu.framework == "ray", "tuning.pruner",
               "pbt (population-based training) needs tuning.framework=ray; Optuna has no population to exploit")
        pi, every = tu.pbt.perturbation_interval, t.eval_every_n_steps
        _check(pi > 0, "tuning.pbt.perturbation_interval", f"must be > 0, got {pi}")
        _check(every > 0 and pi % every == 0, "tuning.pbt.perturbation_interval",
               f"{pi} must be a multiple of training.eval_every_n_steps={every} (trials are compared at evaluations)")
        _check(0 < tu.pbt.quantile_fraction <= 0.5, "tuning.pbt.quantile_fraction", "must be in (0, 0.5]")
        _check(0 <= tu.pbt.resample_probability <= 1, "tuning.pbt.resample_probability", "must be in [0, 1]")
    _check(tu.pruner_startup_trials >= 0, "tuning.pruner_startup_trials", "must be >= 0")
    _check(tu.pruner_warmup_steps >= 0, "tuning.pruner_warmup_steps", "must be >= 0")
    _check(tu.n_jobs >= 1, "tuning.n_jobs", f"must be >= 1, got {tu.n_jobs}")
    _check(tu.heartbeat_s >= 0, "tuning.heartbeat_s", "must be >= 0 (0 = off)")
    _check(tu.timeout_s is None or tu.timeout_s > 0, "tuning.timeout_s", "must be > 0 or null")


def check_device(cfg: DictConfig | VishwamaiConfig) -> None:
    """training.device=cuda on a torch without CUDA (a CPU-only build, or no GPU visible): a config
    error before anything is built, instead of torch's AssertionError deep in model building.
    Kept out of validate(), which checks a config for any machine (e.g. before a pod is started)."""
    import torch

    if cfg.training.device == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise ConfigError("training.device", f"cuda requested but {why} (torch {torch.__version__}); "
                                             "use training.device=cpu or auto")


def _validate_distillation(ds: DistillationConfig) -> None:
    """Static checks; the teacher files and layer ranges are checked by vishwamai.distill's builder."""
    tm = ds.teacher_model
    _check(bool(tm.path) or len(tm.paths) > 0, "distillation.teacher_model.path",
           "distillation.enabled=true needs a teacher: set teacher_model.path (or teacher_model.paths)")
    n_teachers = int(bool(tm.path)) + len(tm.paths)
    _check(not tm.weights or len(tm.weights) == n_teachers, "distillation.teacher_model.weights",
           f"has {len(tm.weights)} entries for {n_teachers} teachers")
    _check(all(w >= 0 for w in tm.weights) and (not tm.weights or sum(tm.weights) > 0),
           "distillation.teacher_model.weights", "must be >= 0 with a positive sum")
    _one_of(tm.dtype, "distillation.teacher_model.dtype", ("float32", "bfloat16"))
    _one_of(ds.student_init, "distillation.student_init", ("random", "teacher_layers"))
    _check(tm.kd_chunk_size > 0, "distillation.teacher_model.kd_chunk_size", "must be > 0")
    for name in ("feature_distillation", "attention_distillation", "hidden_distillation", "embedding_distillation"):
        weight = getattr(ds, name).loss_weight
        _check(weight >= 0, f"distillation.{name}.loss_weight", f"must be >= 0, got {weight}")
    _one_of(ds.feature_distillation.loss, "distillation.feature_distillation.loss", ("mse", "cosine"))
    _one_of(ds.hidden_distillation.loss, "distillation.hidden_distillation.loss", ("mse", "cosine"))
    _one_of(ds.attention_distillation.loss, "distillation.attention_distillation.loss", ("kl", "mse"))
    f = ds.feature_distillation
    _check(not f.enabled or len(f.layers) > 0, "distillation.feature_distillation.layers", "must not be empty")
    _check(f.teacher_layers is None or len(f.teacher_layers) == len(f.layers),
           "distillation.feature_distillation.teacher_layers",
           f"needs one teacher block per student layer ({len(f.layers)}), got {f.teacher_layers}")


def _validate_monitoring(cfg: DictConfig | VishwamaiConfig) -> None:
    mo = cfg.monitoring
    _check(mo.mlflow.close_timeout_s > 0, "monitoring.mlflow.close_timeout_s", "must be > 0")
    _check(mo.histogram_every_n_steps >= 0, "monitoring.histogram_every_n_steps", "must be >= 0 (0 = never)")
    if mo.histogram_every_n_steps:
        _check(mo.enabled and mo.tensorboard.enabled, "monitoring.histogram_every_n_steps",
               "histograms are written to TensorBoard: needs monitoring.enabled=true and "
               "monitoring.tensorboard.enabled=true")
    _check(mo.profile_start >= 0, "monitoring.profile_start", "must be >= 0")
    _check(mo.profile_steps > 0, "monitoring.profile_steps", "must be > 0")
    _check(not mo.profile or mo.enabled, "monitoring.profile", "needs monitoring.enabled=true")
    _check(mo.peak_flops_per_s is None or mo.peak_flops_per_s > 0, "monitoring.peak_flops_per_s",
           "must be > 0 or null")


def _validate_distributed(cfg: DictConfig | VishwamaiConfig) -> None:
    dd = cfg.distributed
    _one_of(dd.strategy, "distributed.strategy", ("none", "data_parallel", "model_parallel"))
    if dd.backend is not None:
        _one_of(dd.backend, "distributed.backend", ("gloo", "nccl"))
    for key in ("world_size", "nproc_per_node"):
        value = getattr(dd, key)
        _check(value is None or value > 0, f"distributed.{key}", f"must be > 0, got {value}")
    _check(dd.node_rank >= 0, "distributed.node_rank", "must be >= 0")
    _check(dd.bucket_cap_mb > 0, "distributed.bucket_cap_mb", "must be > 0")
    _check(dd.timeout_s > 0, "distributed.timeout_s", "must be > 0")
    _check(dd.max_restarts >= 0, "distributed.max_restarts", "must be >= 0")
    ddp_only = "only applies to distributed.strategy=data_parallel"
    _check(not dd.zero_optimizer or dd.strategy == "data_parallel", "distributed.zero_optimizer",
           ddp_only + " (model_parallel already shards the optimizer state)")
    _check(not dd.bf16_grad_compression or dd.strategy == "data_parallel", "distributed.bf16_grad_compression",
           ddp_only)
    _check(cfg.model.parallel_factor == 1 or dd.strategy == "model_parallel", "model.parallel_factor",
           "is the shard-group size of distributed.strategy=model_parallel; leave it 1 otherwise")
