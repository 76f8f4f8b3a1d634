"""NVIDIA DALI frame decoding: the clips of a whole block decoded and resized in one pipeline run.

The encoded videos, the frames wanted from each and the size to decode each at go in through
``fn.external_source`` (one sample per clip, up to ``shuffle_block_clips`` per run);
``fn.decoders.video`` decodes on the CPU (``dali_device="cpu"``: VP9/VP8/MJPEG only) or on the GPU
(``"mixed"``: H.264 as well) and ``fn.resize`` (linear, antialiased) scales each clip to its own size
on the same device, skipping clips already at their size.
Frames come back as host uint8 arrays, as from :class:`~lapa_dist.data.samples.PyAVDecoder`.

A block that DALI cannot decode is retried clip by clip, so only the failing clips become
``BadSample("undecodable_video")``. Asking the CPU decoder for a codec it lacks is a configuration
error and raises ``ValueError`` at once instead of counting every clip as bad.
"""

from __future__ import annotations

import os

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from lapa_dist.data.config import DataConfig
from lapa_dist.data.format import VIDEO_MEMBER
from lapa_dist.data.reader import BadSample
from lapa_dist.data.samples import ClipPlan

CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})  # what fn.decoders.video(device="cpu") decodes


@pipeline_def(enable_conditionals=True, exec_dynamic=True, prefetch_queue_depth=1)  # depth 1: inputs go to run()
def _decode_resize_pipeline(device: str):
    video = fn.external_source(name="video", dtype=types.UINT8, ndim=1)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    size = fn.external_source(name="size", dtype=types.INT32, ndim=1)  # (height, width)
    decoded = fn.decoders.video(video, device=device, frames=frames, pad_mode="none")  # [F, H, W, 3]
    shape = decoded.shape(dtype=types.INT32)
    if (shape[1] != size[0]) | (shape[2] != size[1]):  # per clip; an identity resize would cost 2/3 of the time
        decoded = fn.resize(decoded, size=fn.cast(size, dtype=types.FLOAT), interp_type=types.INTERP_LINEAR,
                            antialias=True)
    return decoded


def _device_id(device: str) -> int | None:
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        raise ValueError(
            "data.dali_device='mixed' decodes on a CUDA GPU and none is available; use data.dali_device='cpu' "
            "with VP9 shards, or data.decoder='pyav'"
        )
    return torch.cuda.current_device()


def check_codecs(plans: list[ClipPlan], device: str) -> None:
    """Raise ValueError when the CPU decoder is asked for a codec it cannot decode (a config error)."""
    if device != "cpu":
        return
    for plan in plans:
        codec = plan.meta.codec.lower()
        if codec not in CPU_CODECS:
            raise ValueError(
                f"data.dali_device='cpu': DALI's CPU video decoder cannot decode {codec} (clip {plan.raw.key} of "
                f"dataset {plan.dataset!r}); it decodes {', '.join(sorted(CPU_CODECS))} only. Use "
                "data.dali_device='mixed' on a GPU, shards written with codec vp9, or data.decoder='pyav'."
            )


def dali_error_detail(error: Exception) -> str:
    """The operator's own message from a DALI pipeline error (the text after 'encountered:')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[-1] if lines else type(error).__name__


class DaliDecoder:
    """FrameDecoder running one DALI pipeline (built once, reused) over each block of plans."""

    def __init__(self, config: DataConfig, num_threads: int | None = None):
        self.device = config.dali_device
        self.pipeline_args = {
            "batch_size": config.shuffle_block_clips,  # the maximum; each run takes the block's clips
            "num_threads": num_threads or len(os.sched_getaffinity(0)),
            "device_id": _device_id(self.device),
        }
        self.pipeline = self._new_pipeline()

    def _new_pipeline(self):
        pipeline = _decode_resize_pipeline(self.device, **self.pipeline_args)
        pipeline.build()
        return pipeline

    def decode(self, plans: list[ClipPlan]) -> list[np.ndarray | BadSample]:
        check_codecs(plans, self.device)
        decodable = [plan for plan in plans if plan.raw.members[VIDEO_MEMBER]]  # PyAV's reason, not DALI's
        decoded = iter(self._decode_block(decodable) if decodable else [])
        return [
            next(decoded) if plan.raw.members[VIDEO_MEMBER] else BadSample(plan.raw.key, "empty_video", "0 bytes")
            for plan in plans
        ]

    def _decode_block(self, plans: list[ClipPlan]) -> list[np.ndarray | BadSample]:
        try:
            return self._run_or_renew(plans)
        except RuntimeError:  # one bad clip fails the whole run: find it by decoding the clips alone
            return [self._decode_alone(plan) for plan in plans]

    def _decode_alone(self, plan: ClipPlan) -> np.ndarray | BadSample:
        try:
            return self._run_or_renew([plan])[0]
        except RuntimeError as error:
            return BadSample(plan.raw.key, "undecodable_video", dali_error_detail(error))

    def _run_or_renew(self, plans: list[ClipPlan]) -> list[np.ndarray]:
        """``_run``; after a failure DALI declares the pipeline object no longer valid: build a new one."""
        try:
            return self._run(plans)
        except RuntimeError:
            self.pipeline = self._new_pipeline()
            raise

    def _run(self, plans: list[ClipPlan]) -> list[np.ndarray]:
        """Frames [len(plan.indices), height, width, 3] of each plan, from one pipeline run.

        DALI decodes each distinct frame once, in order (no seeking back); the host gathers them into
        ``plan.indices`` order, repeats included.
        """
        wanted = [np.unique(np.asarray(plan.indices, dtype=np.int32), return_inverse=True) for plan in plans]
        (output,) = self.pipeline.run(
            video=[np.frombuffer(plan.raw.members[VIDEO_MEMBER], dtype=np.uint8) for plan in plans],
            frames=[unique for unique, _ in wanted],
            size=[np.array(plan.size[::-1], dtype=np.int32) for plan in plans],
        )
        if self.device != "cpu":
            output = output.as_cpu()
        return [np.asarray(output[i])[inverse] for i, (_, inverse) in enumerate(wanted)]
