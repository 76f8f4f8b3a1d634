"""Stages 2 and 3: latent pretraining and action finetuning of the VLA, on DeepSpeed (+ megatron-core TP).

    deepspeed launch/pretrain.py --config configs/openx.json --run-dir runs/vla      # stage "pretrain"
    deepspeed launch/finetune.py --config configs/vla/metaworld_finetune.json ...    # stage "finetune"

One trainer, two stages that differ in their target tokens:

    pretrain  the frame's latent action (``latents.npy`` of labelled shards): s tokens of vocabulary |C|;
    finetune  the frame's robot action, discretised by an ``ActionTokenizer`` fitted on the finetuning data
              (rank 0 fits it before training and saves RUN_DIR/action_tokenizer.json; a resumed run reads it
              back): D tokens of vocabulary max(bins). The latent head and embedding are replaced by new ones
              of that size (``model.sequence.latent_length`` / ``latent_vocab_size`` are set from the tokenizer).

Parallelism: ``parallel.tensor_parallel`` ranks hold one model replica (megatron-core layers in the backbone),
``world_size / tp`` replicas train data-parallel under DeepSpeed ZeRO; both TP ranks of a replica read the
same batches (the loader is sharded by data-parallel rank). Weights at the start come from ``init``: an HF
LLaMA directory for the backbone (sliced per TP rank as it is read), LWM's image-token table, or a previous
VLA run (everything but the finetuning heads). Checkpoints, resume and metrics follow the LAQ trainer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file

from lapa_dist.config import ConfigError, StrictModel
from lapa_dist.data.actions import read_actions
from lapa_dist.data.config import DataConfig
from lapa_dist.data.loader import VideoLoader
from lapa_dist.models.action_tokenizer import TOKENIZER_FILENAME, ActionTokenizer
from lapa_dist.models.hf_llama import load_hf_checkpoint
from lapa_dist.models.lora import LoRAConfig, apply_lora, merge_lora_state_dict
from lapa_dist.models.vla import VLA, VLAConfig
from lapa_dist.models.vla_sequence import SequenceConfig, build_example, collate_examples
from lapa_dist.parallel.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    init_distributed,
    seed_everything,
)
from lapa_dist.parallel.layout import ParallelLayout
from lapa_dist.parallel.tensor_parallel import copy_full_into, materialize, parallelize
from lapa_dist.train.checkpoint import load_checkpoint, prepare_resume, save_checkpoint
from lapa_dist.train.config import RESUMABLE_CHANGES, DeepSpeedConfig, OptimConfig, TrainConfig
from lapa_dist.train.engine import build_engine, engine_dtype
from lapa_dist.train.metrics import LoggingConfig, MetricsLogger
from lapa_dist.train.run_dir import RunDir
from lapa_dist.train.weights import trained_state_dict

HEAD_PARAMETERS = ("latent_embed.weight", "latent_head.weight")
"""The stage-specific token embedding and head: new at the start of action finetuning."""


class ParallelConfig(StrictModel):
    tensor_parallel: int = Field(default=1, ge=1)
    """Ranks per model replica (megatron-core tensor parallelism in the backbone); data parallel = world / this."""


class InitConfig(StrictModel):
    """Where the weights at step 0 come from (later sources override earlier ones; unset = random init)."""

    run: str | None = None
    """A VLA run directory: every parameter of its newest checkpoint, except the latent/action head and
    embedding when this run finetunes (they are new)."""
    backbone: str | None = None
    """An HF LLaMA directory (config.json + safetensors), e.g. tools/convert_lwm.py's ``llm/``: the backbone."""
    image_embed: str | None = None
    """A safetensors file with ``image_embed.weight`` (tools/convert_lwm.py's ``vision_embed.safetensors``)."""


class ActionBinsConfig(StrictModel):
    """Finetuning: how the action tokenizer is fitted (see lapa_dist/models/action_tokenizer.py)."""

    num_bins: int = Field(default=256, ge=1)
    binary_dims: list[int] = Field(default_factory=list)
    """Dimensions kept binary (the gripper)."""
    binary_values: tuple[float, float] | None = None
    """(low, high) of the binary dimensions; default: their fitted min and max."""
    fit_max_clips: int | None = Field(default=None, ge=1)
    """Fit on the first this many clips of the finetuning data (default: all)."""


class VLARunConfig(StrictModel):
    """Everything that defines a VLA training run (saved as RUN_DIR/config.json)."""

    stage: Literal["pretrain", "finetune"]
    model: VLAConfig
    tokenizer: str = Field(min_length=1)
    """Local directory of the HF tokenizer (LLaMA's for LWM)."""
    data: DataConfig
    actions: ActionBinsConfig = ActionBinsConfig()
    parallel: ParallelConfig = ParallelConfig()
    init: InitConfig = InitConfig()
    lora: LoRAConfig = LoRAConfig()
    """Low-rank adapters on the backbone's projections (its base weights then stay frozen)."""
    optim: OptimConfig = OptimConfig(lr=2e-5, betas=(0.9, 0.95), grad_clip=1.0)
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    train: TrainConfig = TrainConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _check(self) -> VLARunConfig:
        target = {"pretrain": "latents", "finetune": "actions"}[self.stage]
        if self.data.view != "frames" or self.data.target != target:
            raise ValueError(f"data: stage {self.stage!r} reads view 'frames' with target {target!r} "
                             f"(got view {self.data.view!r}, target {self.data.target!r})")
        if self.parallel.tensor_parallel > 1 and self.deepspeed.zero_stage == 3:
            raise ValueError("deepspeed.zero_stage 3 does not combine with parallel.tensor_parallel > 1: "
                             "use ZeRO-1/2 over the data-parallel group")
        if self.train.ema_decay is not None:
            raise ValueError("train.ema_decay is not supported for the VLA stages")
        return self


def stage_model_config(config: VLARunConfig, action_tokenizer: ActionTokenizer | None) -> VLAConfig:
    """The model config the stage trains: finetuning sizes the token block and head from the action tokenizer."""
    if action_tokenizer is None:
        return config.model
    sequence = config.model.sequence.model_copy(update={
        "latent_length": action_tokenizer.tokens_per_action, "latent_vocab_size": action_tokenizer.vocab_size})
    return config.model.model_copy(update={"sequence": SequenceConfig.model_validate(sequence.model_dump())})


def fit_action_tokenizer(config: VLARunConfig, run_dir: RunDir, is_main: bool) -> ActionTokenizer:
    """Rank 0 fits the tokenizer once per run (kept in the run directory); every rank then loads it."""
    path = run_dir.path / TOKENIZER_FILENAME
    if is_main and not path.is_file():
        actions, skipped = read_actions(config.data.datasets, config.actions.fit_max_clips)
        bins = config.actions
        tokenizer = ActionTokenizer.fit(actions, bins.num_bins, bins.binary_dims, bins.binary_values)
        tokenizer.save(run_dir.path)
        print(f"action tokenizer: fitted on {len(actions)} actions (clips skipped: {dict(skipped) or 'none'}); "
              f"bins per dimension {list(tokenizer.bin_counts)}", flush=True)
    barrier()
    return ActionTokenizer.load(run_dir.path)


def new_model(config: VLARunConfig, model_config: VLAConfig, device: torch.device,
              backbone_on_meta: bool = False) -> VLA:
    """The stage's VLA with its random initial weights, identical on every rank (one seed), made on ``device`` (on
    a GPU no host copy is built); ``backbone_on_meta`` leaves the backbone without storage, for weights that are
    loaded after ``parallelize`` and ``materialize``, so that a 7B backbone is never whole on one rank."""
    torch.manual_seed(config.train.seed)
    with torch.device(device):
        model = VLA(model_config, backbone_device="meta" if backbone_on_meta else None)
    if model.image_size != config.data.image_size:
        raise ConfigError(f"data.image_size is {config.data.image_size} but the vision tower reads "
                          f"{model.image_size} x {model.image_size} images")
    return model


def load_initial_weights(model: VLA, init: InitConfig, layout: ParallelLayout, finetune: bool) -> list[str]:
    """Copy ``init``'s sources into the (parallelized) model, each tensor sliced for this TP rank; returns
    what was loaded, for the log."""
    loaded = []
    params = dict(model.named_parameters())
    for field in ("run", "backbone", "image_embed"):
        path = getattr(init, field)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"init.{field}: {path} does not exist")
    if init.run:
        state, source = run_weights(init.run)
        skip = set(HEAD_PARAMETERS) if finetune else set()
        unknown = sorted(name for name in state if name not in params and name not in skip)
        if unknown:
            raise ValueError(f"init.run {init.run}: {len(unknown)} tensors the model does not have, e.g. {unknown[:3]}")
        for name, param in params.items():
            if name in skip:
                continue
            if name not in state:
                raise ValueError(f"init.run {init.run}: the checkpoint has no {name}")
            copy_full_into(param, state[name].to(param.dtype), layout, f"init.run: {name}")
        loaded.append(f"run {source}" + (" (new latent/action head)" if finetune else ""))
    if init.backbone:
        load_hf_checkpoint(model.llm, init.backbone, layout.tp_rank, layout.tp)
        loaded.append(f"backbone {init.backbone}")
    if init.image_embed:
        if model.image_embed is None:
            raise ValueError("init.image_embed is set but the vit tower has no image-token table")
        tensors = load_file(init.image_embed)
        if "image_embed.weight" not in tensors:
            raise ValueError(f"init.image_embed {init.image_embed}: no tensor 'image_embed.weight'")
        table, rows = tensors["image_embed.weight"], model.image_embed.weight.shape[0]
        if table.shape[0] > rows:  # LWM's vte has 8448 rows; ids past codes + end-of-vision are never used
            table = table[:rows]
        copy_full_into(model.image_embed.weight, table, layout, "init.image_embed")
        loaded.append(f"image_embed {init.image_embed} (first {rows} rows)")
    return loaded


def run_weights(run_dir: str | Path, tag: str | None = None) -> tuple[dict, str]:
    """The full state dict of a VLA run (LoRA adapters folded into the base weights) and its description."""
    state, source = trained_state_dict(RunDir(run_dir), tag, prefer_ema=False)
    lora = VLARunConfig.model_validate_json((Path(run_dir) / "config.json").read_text()).lora
    if lora.enabled:
        state = merge_lora_state_dict(state, lora)
        source += ", LoRA merged"
    return state, source


class ExampleBuilder:
    """Instruction + target tokens -> one sequence example, cached: a run sees few distinct instructions, and
    the image positions are placeholders (the tower fills them on the device)."""

    MAX_CACHED = 100_000

    def __init__(self, tokenizer, sequence: SequenceConfig):
        self.tokenizer, self.sequence = tokenizer, sequence
        self.image_placeholder = torch.zeros(sequence.num_image_tokens, dtype=torch.long)
        self.cache: dict[tuple, dict] = {}

    def __call__(self, instruction: str, target_tokens: torch.Tensor) -> dict:
        key = (instruction, tuple(target_tokens.tolist()))
        if key not in self.cache:
            if len(self.cache) >= self.MAX_CACHED:
                self.cache.clear()
            self.cache[key] = build_example(self.tokenizer, instruction, self.image_placeholder, target_tokens,
                                            self.sequence)
        return self.cache[key]


def model_batch(batch: dict, examples: ExampleBuilder, pad_token_id: int, action_tokenizer: ActionTokenizer | None,
                device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A loader batch (frames view) -> the model's batch on ``device``: sequences [B, T] built around the target
    tokens (the latent codes, or the actions tokenized by ``action_tokenizer``) and images [B, 3, S, S]."""
    targets = (batch["target"].long() if action_tokenizer is None
               else torch.from_numpy(action_tokenizer.encode(batch["target"].numpy())))  # [B, s]
    rows = [examples(instruction, tokens) for instruction, tokens in zip(batch["instruction"], targets)]
    sequences = collate_examples(rows, pad_token_id=pad_token_id)
    on_device = {name: value.to(device, non_blocking=True) for name, value in sequences.items()}
    on_device["loss_weight"] = on_device["loss_weight"].float()
    on_device["images"] = batch["x_t"].to(device, non_blocking=True).to(dtype).div_(255)
    return on_device


class VLATrainer:
    def __init__(self, config: VLARunConfig, run_dir: str):
        from transformers import AutoTokenizer

        self.config = config
        self.ctx: DistributedContext = init_distributed()
        self.layout = ParallelLayout.create(self.ctx, config.parallel.tensor_parallel)
        self.run_dir = RunDir(run_dir)
        self.run_dir.prepare(config, self.ctx.is_main, RESUMABLE_CHANGES)
        finetune = config.stage == "finetune"
        self.action_tokenizer = fit_action_tokenizer(config, self.run_dir, self.ctx.is_main) if finetune else None
        self.model_config = stage_model_config(config, self.action_tokenizer)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, local_files_only=True)
        self.resume_tag, self.resume_universal = prepare_resume(self.run_dir, self.ctx.world_size, self.ctx.rank)
        # The backbone is built without storage when every one of its weights is loaded afterwards (checkpoint,
        # HF backbone or previous run): each rank then only ever allocates its own tensor-parallel slices.
        backbone_loaded = self.resume_tag is not None or config.init.backbone or config.init.run
        model = new_model(config, self.model_config, self.ctx.device, backbone_on_meta=bool(backbone_loaded))
        if self.layout.tp > 1:
            parallelize(model.llm, self.layout)
        materialize(model.llm, self.ctx.device)
        if self.resume_tag is None:
            for line in load_initial_weights(model, config.init, self.layout, finetune):
                if self.ctx.is_main:
                    print(f"init: {line}", flush=True)
        apply_lora(model.llm, config.lora, self.layout)  # after loading: the base keys stay plain
        self.engine = build_engine(model, config.optim, config.deepspeed, config.data.batch_size, self.layout.dp,
                                   config.train.steps, self.resume_universal, self.layout.mpu())
        self.dtype = engine_dtype(config.deepspeed)
        self.loader = VideoLoader(config.data, self.layout.dp_rank, self.layout.dp)
        self.examples = ExampleBuilder(self.tokenizer, self.model_config.sequence)
        self.step = 0
        seed_everything(config.train.seed, self.layout.dp_rank)
        self._resume()

    def _resume(self) -> None:
        if self.resume_tag is None:
            return
        extra = load_checkpoint(self.engine, self.run_dir, self.resume_tag, self.ctx.rank, self.ctx.world_size,
                                self.resume_universal)
        self.step = extra["step"]
        self.loader.load_state_dict(extra["loader"])
        if self.ctx.is_main:
            self.run_dir.truncate_metrics(self.step)
            print(f"resumed from {self.resume_tag} (step {self.step})", flush=True)

    def model_batch(self, batch: dict) -> dict[str, torch.Tensor]:
        return model_batch(batch, self.examples, self.tokenizer.pad_token_id or 0, self.action_tokenizer,
                           self.ctx.device, self.dtype)

    def train_step(self, batches: Iterator[dict]) -> tuple[dict, float, int]:
        """One optimizer step over gradient_accumulation micro-batches: (metrics tensors of the last micro-batch,
        seconds waiting for data, tokens processed)."""
        data_wait, tokens = 0.0, 0
        for _ in range(self.config.deepspeed.gradient_accumulation):
            start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - start
            inputs = self.model_batch(batch)
            tokens += int(inputs["attention_mask"].sum())
            output = self.engine(inputs)
            self.engine.backward(output.loss)
            self.engine.step()
        values = {"loss": output.loss.detach().float(), "token_loss": output.latent_loss,
                  "text_loss": output.text_loss, "token_accuracy": output.latent_accuracy}
        return values, data_wait, tokens

    def train(self) -> None:
        config = self.config
        logger = MetricsLogger(self.run_dir, config.logging, self.ctx.is_main, config.train.steps, self.step,
                               config.model_dump(), f"vla-{config.stage}")
        batches = iter(self.loader)
        interval_start, interval_steps, data_wait, tokens = time.perf_counter(), 0, 0.0, 0
        while self.step < config.train.steps:
            values, wait, step_tokens = self.train_step(batches)
            self.step += 1
            interval_steps, data_wait, tokens = interval_steps + 1, data_wait + wait, tokens + step_tokens
            logger.step(self.step)
            if self.step % config.logging.log_every == 0 or self.step == config.train.steps:
                elapsed = time.perf_counter() - interval_start
                replicas = torch.tensor([float(tokens)])
                all_reduce_sum(replicas)  # tokens over all ranks; TP ranks of a replica count the same tokens
                values = {name: float(all_reduce_sum(value.detach().float().clone()) / self.ctx.world_size)
                          for name, value in values.items()}
                values.update(
                    lr=self.engine.get_lr()[0],
                    tokens_per_s=float(replicas) / self.layout.tp / elapsed,
                    samples_per_s=config.data.batch_size * config.deepspeed.gradient_accumulation * self.layout.dp
                    * interval_steps / elapsed,
                    step_time_s=elapsed / interval_steps,
                    data_wait_s=data_wait / interval_steps,
                )
                if self.action_tokenizer is not None:
                    values["actions_out_of_range"] = int(self.action_tokenizer.out_of_range_counts.sum())
                logger.log(self.step, values)
                interval_start, interval_steps, data_wait, tokens = time.perf_counter(), 0, 0.0, 0
            if self.step % config.train.save_every == 0 or self.step == config.train.steps:
                save_checkpoint(self.engine, self.run_dir, self.step, {"loader": self.loader.state_dict()},
                                self.ctx.rank, config.train.keep_checkpoints)
        logger.close()


def run_stage(stage: str, description: str, argv: list[str] | None = None) -> int:
    """The body of launch/pretrain.py and launch/finetune.py: the launcher of ``stage`` refuses the other's config."""
    from lapa_dist.train.launcher import run_trainer

    def check(config: VLARunConfig) -> None:
        if config.stage != stage:
            raise ConfigError(f"stage: this launcher runs {stage!r}, the config says {config.stage!r}")

    return run_trainer(stage, description, VLARunConfig, VLATrainer, argv, check)
