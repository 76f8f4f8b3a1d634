"""The VPT baseline: an inverse-dynamics model (IDM) trained on labelled demos pseudo-labels actionless video.

VPT (Baker et al., 2022) trains an IDM on a small set of videos with actions and uses it to label a large video
corpus; a policy is then pretrained on the pseudo actions. In the LAPA paper's VPT row these pseudo actions take
the place of the latent actions in the same VLA pipeline.

The IDM sees a frame pair (x_t, x_{t+k}), k = ``model.frame_offset``, and predicts the k actions a_t .. a_{t+k-1}
that lead from one frame to the other. VPT's IDM sees a non-causal window of frames around t; a pair is the
smallest such window, and k = 1 (the default) is the minimal faithful version: a_t from (x_t, x_{t+1}). A larger
k widens the window for high control rates, where one step barely moves the image.

Model: a conv net over the 9 channels [x_t, x_{t+k}, x_{t+k} - x_t] (the difference is linear in the inputs, but
a channel of its own makes the motion visible from the first step), stride-2 stages with GroupNorm and GELU,
global average and max pooling (motion is local; the max keeps it), an MLP head. It regresses standardised
actions ((a - mean) / std per dimension, over the training clips) with a per-dimension Huber or MSE loss; mean
and std are buffers of the model, so the saved weights are self-contained.

Training (``train_idm``, one process): the lapa_dist video loader, view "pairs" with offset k, whose pairs carry
``actions`` [B, k, action_dim]. Whole clips are held out for validation by a hash of their key, so no frame of a
validation episode is trained on; the loader reads those clips too and their rows are dropped from the batch (a
step trains on about (1 - val_fraction) x batch_size pairs). Re-running on the same directory resumes.

The IDM directory:

    config.json         the resolved IDMConfig (model.action_dim filled in from the data)
    model.safetensors   weights and action statistics, written when training ends
    val_metrics.json    R² and MSE per action dimension on the held-out clips, and the mean-action baseline's
    metrics.jsonl       training loss every logging.log_every steps
    checkpoints/        step-NNNNNNNN/state.pt + COMPLETE (model, optimiser, schedule, loader position)

Pseudo-labelling (``pseudo_label_shard_set``), like lapa_dist.labelling: every clip of the input set is copied
with its video bytes unchanged; ``actions.npy`` (float32 [num_frames - 1, action_dim]) is added, or replaced,
with the IDM's predictions; the json gets ``action_dim`` and ``extra["actions_source"] = "vpt_idm:<idm dir>"``.
a_t comes from the pair starting at t; the last k - 1 steps, which have no frame t + k, take the later rows of
the last pair's prediction. A shard whose output sidecar exists is skipped, so re-running resumes; clips that
cannot be labelled (undecodable video, fewer than k + 1 frames) are copied unchanged and counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from lapa_dist.config import StrictModel
from lapa_dist.data.config import AugmentConfig, DataConfig, DatasetSpec
from lapa_dist.data.format import ClipMeta, Manifest, npy_bytes, sidecar_path, write_json_atomic
from lapa_dist.data.loader import VideoLoader
from lapa_dist.data.reader import BadSample, RawSample, iter_parsed_samples, parse_meta
from lapa_dist.eval.probes import r_squared
from lapa_dist.labelling import clip_frames, relabel_shard
from lapa_dist.train.config import OptimConfig
from lapa_dist.train.engine import lr_lambda
from lapa_dist.train.metrics import LoggingConfig, MetricsLogger
from lapa_dist.train.run_dir import COMPLETE_MARKER, RunDir, checkpoint_tag

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
VAL_METRICS_FILE = "val_metrics.json"
LABELS_RECORD = "vpt_labels.json"
"""In a pseudo-labelled set: which IDM (directory and weights digest) labelled it."""
RESUMABLE_CHANGES = ("steps", "save_every", "logging", "num_workers")
"""IDMConfig keys a re-run on an existing IDM directory may change (everything else must match)."""


class VPTInputError(ValueError):
    """An input directory that cannot be used; the message names it and says why."""


class IDMModelConfig(StrictModel):
    """The inverse-dynamics network."""

    image_size: int = Field(default=64, ge=8)
    """Frames are resized (shorter side) and centre-cropped to image_size x image_size, as the loader does."""
    frame_offset: int = Field(default=1, ge=1)
    """k: the IDM sees (x_t, x_{t+k}) and predicts a_t .. a_{t+k-1}; 1 is the two-frame IDM."""
    widths: list[int] = Field(default=[32, 64, 128, 128], min_length=1)
    """Channels of each stage (a stride-2 3x3 conv then a 3x3 conv, each with GroupNorm and GELU)."""
    hidden: int = Field(default=256, ge=1)
    """Width of the MLP head."""
    action_dim: int | None = Field(default=None, ge=1)
    """Action dimensions; filled in from the labelled set when training starts (leave unset)."""


class IDMConfig(StrictModel):
    """Everything that defines an IDM training run (saved as IDM_DIR/config.json)."""

    model: IDMModelConfig = Field(default_factory=IDMModelConfig)
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(
            lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-4, grad_clip=1.0, schedule="cosine", warmup_steps=50
        )
    )
    """AdamW and its schedule (lapa_dist.train.config.OptimConfig)."""
    loss: Literal["huber", "mse"] = "huber"
    """Per-dimension loss on the standardised actions (Huber with delta 1)."""
    steps: int = Field(default=2000, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(default=64, ge=1)
    """Pairs per loader batch (held-out clips' rows are then dropped)."""
    seed: int = 0
    """Initial weights and loader order."""
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Fraction of clips held out for validation, chosen by a hash of the clip key (independent of seed)."""
    samples_per_clip: int = Field(default=8, ge=1)
    """Pairs drawn from each decoded clip."""
    shuffle_block_clips: int = Field(default=8, ge=1)
    """Clips decoded together whose pairs are shuffled before batching."""
    num_workers: int = Field(default=0, ge=0)
    """Loader worker processes (0: decode in the training process)."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Crop and colour jitter, identical for both frames of a pair (off by default)."""
    save_every: int = Field(default=500, ge=1)
    """Checkpoint every this many steps (the newest is kept); the last step is always saved."""
    eval_batch_size: int = Field(default=128, ge=1)
    """Pairs per forward when validating."""
    logging: LoggingConfig = Field(default_factory=lambda: LoggingConfig(wandb=False))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, 8), channels)


class IDM(nn.Module):
    """(x_t, x_{t+k}) float [B, 3, S, S] in [0, 1] -> the k actions a_t .. a_{t+k-1} [B, k, action_dim]."""

    def __init__(self, config: IDMModelConfig):
        super().__init__()
        if config.action_dim is None:
            raise ValueError("IDMModelConfig.action_dim is unset (train_idm fills it in from the data)")
        self.config = config
        layers: list[nn.Module] = []
        previous = 9
        for width in config.widths:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), _group_norm(width), nn.GELU(),
                       nn.Conv2d(width, width, 3, padding=1), _group_norm(width), nn.GELU()]
            previous = width
        self.features = nn.Sequential(*layers)
        outputs = config.frame_offset * config.action_dim
        self.head = nn.Sequential(nn.Linear(2 * previous, config.hidden), nn.GELU(), nn.Linear(config.hidden, outputs))
        self.register_buffer("action_mean", torch.zeros(config.action_dim))
        self.register_buffer("action_std", torch.ones(config.action_dim))

    def forward(self, x_t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """Standardised actions [B, k, action_dim]."""
        x = torch.cat([x_t, x_next, x_next - x_t], dim=1) * 2 - 1  # [B, 9, S, S]
        features = self.features(x)  # [B, C, s, s]
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)  # [B, 2C]
        return self.head(pooled).unflatten(1, (self.config.frame_offset, self.config.action_dim))

    def standardise(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions - self.action_mean) / self.action_std

    @torch.no_grad()
    def predict(self, x_t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """Actions in the data's units [B, k, action_dim]."""
        return self(x_t, x_next) * self.action_std + self.action_mean


def set_action_stats(model: IDM, mean: np.ndarray, std: np.ndarray) -> None:
    model.action_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
    model.action_std.copy_(torch.as_tensor(std, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------- inputs


def read_shard_set(directory: str | os.PathLike, flag: str) -> Manifest:
    """The manifest of a shard set that holds at least one clip; VPTInputError naming ``flag`` otherwise."""
    path = Path(directory)
    if not path.is_dir():
        raise VPTInputError(f"{flag} {path}: no such directory")
    try:
        manifest = Manifest.read(path)
    except (FileNotFoundError, ValueError) as error:
        raise VPTInputError(f"{flag} {path}: not a shard set ({str(error).splitlines()[0]})") from None
    if not manifest.shards or manifest.clips == 0 or manifest.frames == 0:
        raise VPTInputError(f"{flag} {path}: the shard set holds no clips, so no frames to learn from or label")
    return manifest


def is_held_out(key: str, fraction: float) -> bool:
    """Whether clip ``key`` is a validation clip: a hash of the key, uniform in [0, 1), below ``fraction``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


@dataclass
class LabelledSet:
    """What training needs to know about the labelled set before reading pixels."""

    action_dim: int
    train_keys: set[str]
    held_out_keys: set[str]
    mean: np.ndarray  # [action_dim] over the training clips' actions
    std: np.ndarray  # [action_dim]; 1 where an action dimension is constant
    train_steps: int  # actions (pairs (t, t + 1)) in the training clips
    problems: Counter = field(default_factory=Counter)


def scan_labelled_set(directory: Path, val_fraction: float, frame_offset: int) -> LabelledSet:
    """Split the clips with actions into training and held-out, and standardise by the training actions."""
    read_shard_set(directory, "--labelled")  # a clear error for a missing or empty set
    problems: Counter = Counter()
    dims: Counter = Counter()
    train_keys, held_out_keys = set(), set()
    total, total_sq, count = 0.0, 0.0, 0
    for parsed in iter_parsed_samples(directory, problems):
        actions = parsed.actions
        if actions is None:
            problems["no_actions"] += 1
            continue
        if actions.shape[0] < frame_offset:
            problems["too_short"] += 1
            continue
        dims[actions.shape[1]] += 1
        if is_held_out(parsed.key, val_fraction):
            held_out_keys.add(parsed.key)
            continue
        train_keys.add(parsed.key)
        values = actions.astype(np.float64)
        total, total_sq, count = total + values.sum(0), total_sq + (values**2).sum(0), count + len(values)
    if not dims:
        raise VPTInputError(
            f"--labelled {directory}: no clip holds actions.npy with at least {frame_offset + 1} frames "
            f"(problems: {dict(problems)}); the IDM needs a labelled set"
        )
    if len(dims) > 1:
        raise VPTInputError(f"--labelled {directory}: clips disagree on action_dim (clips per dim: {dict(dims)})")
    if not train_keys or not held_out_keys:
        raise VPTInputError(
            f"--labelled {directory}: val_fraction {val_fraction} leaves {len(train_keys)} training and "
            f"{len(held_out_keys)} held-out clips; both need at least one (use more clips or change val_fraction)"
        )
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0))
    std = np.where(std > 1e-6, std, 1.0)
    return LabelledSet(next(iter(dims)), train_keys, held_out_keys, mean, std, count, problems)


# --------------------------------------------------------------------------------------------- training


def loader_config(config: IDMConfig, directory: Path) -> DataConfig:
    spec = DatasetSpec(name="labelled", path=str(directory), offset_frames=config.model.frame_offset)
    return DataConfig(
        datasets=[spec], view="pairs", image_size=config.model.image_size, samples_per_clip=config.samples_per_clip,
        shuffle_block_clips=config.shuffle_block_clips, batch_size=config.batch_size,
        num_workers=config.num_workers, seed=config.seed, augment=config.augment,
    )


def training_rows(batch: dict, held_out_keys: set[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(x_t uint8, x_next uint8, actions [n, k, d]) of the rows from training clips with actions, or None."""
    if "actions" not in batch:
        return None
    keep = batch["actions_mask"].numpy() & np.array([key not in held_out_keys for key in batch["key"]])
    if not keep.any():
        return None
    rows = torch.from_numpy(np.flatnonzero(keep))
    return batch["x_t"][rows], batch["x_next"][rows], batch["actions"][rows]


def idm_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(prediction, target)
    return F.huber_loss(prediction, target, delta=1.0)


def unit_float(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    return frames.to(device).float().div_(255)


class IDMTrainer:
    """Builds the model, optimiser and loader for one IDM directory and runs (or resumes) training."""

    def __init__(self, config: IDMConfig, labelled_dir: Path, out_dir: Path, device: torch.device):
        self.labelled = scan_labelled_set(labelled_dir, config.val_fraction, config.model.frame_offset)
        model_config = config.model.model_copy(update={"action_dim": self.labelled.action_dim})
        self.config = config.model_copy(update={"model": model_config})
        self.labelled_dir, self.device = labelled_dir, device
        self.run_dir = RunDir(out_dir)
        self.run_dir.prepare(self.config, True, RESUMABLE_CHANGES)
        torch.manual_seed(self.config.seed)
        self.model = IDM(self.config.model)
        set_action_stats(self.model, self.labelled.mean, self.labelled.std)
        self.model.to(device)
        optim = self.config.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, lr_lambda(optim, self.config.steps))
        self.loader = VideoLoader(loader_config(self.config, labelled_dir))
        self.step = 0
        self._resume()

    def _resume(self) -> None:
        tag = self.run_dir.latest_checkpoint()
        if tag is None:
            return
        state = torch.load(self.run_dir.checkpoints / tag / "state.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        self.run_dir.truncate_metrics(self.step)
        log.info("resumed IDM training from %s (step %d)", tag, self.step)

    def save_checkpoint(self) -> None:
        tag = checkpoint_tag(self.step)
        directory = self.run_dir.checkpoints / tag
        directory.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(), "step": self.step}
        torch.save(state, directory / "state.pt")
        (directory / COMPLETE_MARKER).touch()
        for old in self.run_dir.checkpoints.glob("step-*"):
            if old.name != tag:
                shutil.rmtree(old)

    def train_step(self, x_t: torch.Tensor, x_next: torch.Tensor, actions: torch.Tensor) -> dict:
        prediction = self.model(unit_float(x_t, self.device), unit_float(x_next, self.device))
        target = self.model.standardise(actions.to(self.device).float())
        loss = idm_loss(prediction, target, self.config.loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optim.grad_clip
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": loss.detach(), "standardised_mse": F.mse_loss(prediction.detach(), target),
                "grad_norm": grad_norm, "pairs": x_t.shape[0]}

    def train(self) -> None:
        config = self.config
        logger = MetricsLogger(self.run_dir, config.logging, True, config.steps, self.step, config.model_dump(),
                               "idm")
        batches = iter(self.loader)
        self.model.train()
        interval_start, interval_steps = time.perf_counter(), 0
        while self.step < config.steps:
            rows = training_rows(next(batches), self.labelled.held_out_keys)
            if rows is None:  # every row of this batch came from a held-out clip or a clip without actions
                continue
            values = self.train_step(*rows)
            self.step += 1
            interval_steps += 1
            logger.step(self.step)
            if self.step % config.logging.log_every == 0 or self.step == config.steps:
                elapsed = time.perf_counter() - interval_start
                values.update(lr=self.scheduler.get_last_lr()[0], step_time_s=elapsed / interval_steps)
                logger.log(self.step, values)
                interval_start, interval_steps = time.perf_counter(), 0
            if self.step % config.save_every == 0 or self.step == config.steps:
                self.save_checkpoint()
        logger.close()
        self.model.eval()

    def save_weights(self) -> Path:
        path = self.run_dir.path / WEIGHTS_FILE
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.model.state_dict().items()},
                  str(tmp))
        os.replace(tmp, path)
        return path


def train_idm(config: IDMConfig, labelled_shards_dir: str | os.PathLike, out_dir: str | os.PathLike,
              device: str | torch.device = "cpu") -> dict:
    """Train (or resume) an IDM on a labelled shard set; returns and saves the held-out validation metrics."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise VPTInputError(f"--out {out}: exists and is not a directory")
    start = time.perf_counter()
    trainer = IDMTrainer(config, Path(labelled_shards_dir), out, torch.device(device))
    trainer.train()
    trainer.save_weights()
    metrics = evaluate_idm(trainer.model, Path(labelled_shards_dir), trainer.labelled.held_out_keys,
                           trainer.config.eval_batch_size, torch.device(device))
    metrics.update(
        step=trainer.step, train_clips=len(trainer.labelled.train_keys), train_actions=trainer.labelled.train_steps,
        scan_problems=dict(trainer.labelled.problems), seconds_this_run=time.perf_counter() - start,
    )
    write_json_atomic(out / VAL_METRICS_FILE, metrics)
    return metrics


# ------------------------------------------------------------------------------------ prediction and eval


@torch.no_grad()
def predict_clip(model: IDM, frames: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """a_t for every t of a clip: float32 [T - 1, action_dim] from frames float [T, 3, S, S] (T >= k + 1)."""
    k, num_frames = model.config.frame_offset, frames.shape[0]
    if num_frames < k + 1:
        raise ValueError(f"{num_frames} frames: the IDM needs at least k + 1 = {k + 1}")
    windows = []
    for start in range(0, num_frames - k, batch_size):
        stop = min(start + batch_size, num_frames - k)
        windows.append(model.predict(frames[start:stop].to(device), frames[start + k : stop + k].to(device)).cpu())
    predicted = torch.cat(windows)  # [T - k, k, d]: row j of pair t is a_{t+j}
    return torch.cat([predicted[:, 0], predicted[-1, 1:]]).float().numpy()  # [T - 1, d]


def clip_predictions(model: IDM, sample: RawSample, batch_size: int, device: torch.device) -> np.ndarray:
    """The IDM's actions [num_frames - 1, d] for a raw clip; BadSample when it cannot be labelled."""
    meta = parse_meta(sample)
    k = model.config.frame_offset
    if meta.num_frames < k + 1:
        raise BadSample(sample.key, "too_short", f"{meta.num_frames} frames; the IDM needs k + 1 = {k + 1}")
    frames = clip_frames(sample, model.config.image_size)
    if frames.shape[0] != meta.num_frames:
        detail = f"decoded {frames.shape[0]} frames, json says {meta.num_frames}"
        raise BadSample(sample.key, "undecodable_video", detail)
    return predict_clip(model, frames, batch_size, device)


def regression_metrics(targets: np.ndarray, predictions: np.ndarray, mean: np.ndarray) -> dict:
    """R² and MSE per dimension of predictions [N, d], and of always predicting ``mean`` [d] (the baseline)."""
    r2 = r_squared(targets, predictions)
    baseline = np.broadcast_to(mean, targets.shape)
    return {
        "r2_per_dim": [float(v) for v in r2],
        "r2_mean": float(np.nanmean(r2)) if np.isfinite(r2).any() else float("nan"),
        "mse_per_dim": ((targets - predictions) ** 2).mean(0).tolist(),
        "mean_baseline_r2_per_dim": [float(v) for v in r_squared(targets, baseline)],
        "mean_baseline_mse_per_dim": ((targets - baseline) ** 2).mean(0).tolist(),
    }


@torch.no_grad()
def evaluate_idm(model: IDM, directory: Path, keys: set[str], batch_size: int, device: torch.device) -> dict:
    """Held-out metrics over every action of the clips ``keys``, predicted as pseudo-labelling predicts them."""
    model.eval()
    targets, predictions, problems = [], [], Counter()
    for parsed in iter_parsed_samples(directory, problems, keys=keys):
        try:
            predicted = clip_predictions(model, parsed.sample, batch_size, device)
        except BadSample as bad:
            problems[bad.reason] += 1
            continue
        targets.append(parsed.actions)
        predictions.append(predicted)
    if not targets:
        raise VPTInputError(f"{directory}: none of the {len(keys)} held-out clips could be decoded ({dict(problems)})")
    target, prediction = np.concatenate(targets), np.concatenate(predictions)
    metrics = regression_metrics(target, prediction, model.action_mean.cpu().numpy())
    metrics.update(val_clips=len(targets), val_actions=len(target), val_problems=dict(problems))
    return metrics


def load_idm(idm_dir: str | os.PathLike, device: str | torch.device = "cpu") -> IDM:
    """The trained IDM of an IDM directory, in eval mode."""
    directory = Path(idm_dir)
    if not directory.is_dir():
        raise VPTInputError(f"--idm {directory}: no such directory")
    config_path, weights = directory / "config.json", directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise VPTInputError(f"--idm {directory}: no config.json; is it a directory written by `tools/vpt.py train`?")
    if not weights.is_file():
        raise VPTInputError(
            f"--idm {directory}: no {WEIGHTS_FILE}, so no trained weights (training has not finished; re-run "
            "`tools/vpt.py train` with the same --out to resume it)"
        )
    try:
        config = IDMConfig.model_validate_json(config_path.read_text())
        model = IDM(config.model)
    except (ValidationError, ValueError) as error:
        raise VPTInputError(f"--idm {config_path}: not an IDM config ({str(error).splitlines()[0]})") from None
    model.load_state_dict(load_file(str(weights)))
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------ pseudo-labels


def pseudo_label_shard(model: IDM, input_path: Path, output_path: Path, source: str, batch_size: int,
                       device: torch.device, counts: Counter) -> None:
    """Copy one shard with the IDM's actions added to every clip that can be labelled."""

    def action_members(sample: RawSample, meta: ClipMeta) -> dict[str, bytes]:
        actions = clip_predictions(model, sample, batch_size, device)
        labelled = meta.model_copy(update={"action_dim": actions.shape[1],
                                           "extra": {**meta.extra, "actions_source": source}})
        return {"json": labelled.model_dump_json(exclude_none=True).encode(), "actions.npy": npy_bytes(actions)}

    relabel_shard(input_path, output_path, action_members, counts)


def _weights_digest(idm_dir: Path) -> str:
    return hashlib.sha256((idm_dir / WEIGHTS_FILE).read_bytes()).hexdigest()


def _check_labels_record(output_dir: Path, idm_dir: Path) -> None:
    """Refuse to resume an output set that another IDM (other weights) started; record ours otherwise."""
    record = {"idm_dir": str(idm_dir), "weights_sha256": _weights_digest(idm_dir)}
    path = output_dir / LABELS_RECORD
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("weights_sha256") != record["weights_sha256"]:
            raise VPTInputError(
                f"--output {output_dir}: partly labelled by another IDM ({old.get('idm_dir')}, other weights); "
                "use a new output directory"
            )
    elif any(output_dir.glob("shard-*.tar")):
        raise VPTInputError(f"--output {output_dir}: holds shards not written by tools/vpt.py label")
    write_json_atomic(path, record)


def pseudo_label_shard_set(idm_dir: str | os.PathLike, input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                           batch_size: int = 256, device: str | torch.device = "cpu") -> dict:
    """Pseudo-label every clip of ``input_dir`` into ``output_dir`` with the IDM of ``idm_dir``; re-running skips
    the shards already done. Returns counts: shards labelled and skipped, clips labelled, problems by reason."""
    idm_path, input_path, output_path = Path(idm_dir).resolve(), Path(input_dir), Path(output_dir)
    model = load_idm(idm_path, device)
    manifest = read_shard_set(input_path, "--input")
    if output_path.resolve() == input_path.resolve():
        raise VPTInputError(f"--output {output_path}: must differ from --input")
    output_path.mkdir(parents=True, exist_ok=True)
    _check_labels_record(output_path, idm_path)
    counts: Counter = Counter()
    source = f"vpt_idm:{idm_path}"
    for shard in manifest.shards:
        if sidecar_path(output_path / shard.name).is_file():
            counts["shards_skipped"] += 1
            continue
        pseudo_label_shard(model, input_path / shard.name, output_path / shard.name, source, batch_size,
                           torch.device(device), counts)
        counts["shards_labelled"] += 1
    Manifest.gather(output_path, source=f"vpt_pseudo:{manifest.source}").write(output_path)
    return dict(counts)
