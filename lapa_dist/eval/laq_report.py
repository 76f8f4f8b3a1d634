"""LAQ diagnostics (tools/laq_report.py): are the latent actions actions, or just compression?

From a trained LAQ run and a shard set labelled with it (launch/label.py), writes to the output directory:

- reconstructions.png: rows of (x_t, x_{t+H}, decode(x_t, the pair's own latent action from the shards),
  |prediction − x_{t+H}|), and the reconstruction metrics pooled over up to ``pairs`` random pairs;
- atlas.png: a few x_t, each decoded under each of the ``top_k`` most frequent latent actions of the labelled set
  (as in the LAPA paper's Figures 5 and 12);
- where the shards carry true actions: actions_by_latent.png (the true action of each pair, coloured by its latent
  action) and the probes of :mod:`lapa_dist.eval.probes`. The true action of a pair (t, t + H) is the SUM of the
  actions t .. t+H-1, i.e. the displacement over the pair's H steps for delta actions;
- report.md (all numbers, the figures, one verdict line per check) and report.json (the same numbers).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from lapa_dist.data.format import Manifest
from lapa_dist.data.reader import RawSample, iter_parsed_samples
from lapa_dist.eval.probes import linear_probe, purity_probe
from lapa_dist.eval.reconstruction import psnr, reconstruction_metrics
from lapa_dist.labelling import clip_frames, latent_distribution
from lapa_dist.models.laq import LAQ
from lapa_dist.train.laq import load_trained_laq

FIGURES = {"reconstructions": "reconstructions.png", "atlas": "atlas.png", "actions": "actions_by_latent.png"}
GRID_ROWS = 8
ATLAS_ROWS = 4
CHANGE_THRESHOLD = 0.05
"""A pixel has changed when |x_{t+H} − x_t| exceeds this in some channel (as in the training metrics)."""
MIN_CODES_USED_FRACTION = 0.75
"""Codebook-usage check: at least this fraction of the codes is used (6 of 8)."""


@dataclass
class LabelledClip:
    sample: RawSample
    offset: int  # H of the clip's latents
    latents: np.ndarray  # int16 [T - H, s]
    actions: np.ndarray | None  # float32 [T - H, action_dim]: sum of the actions t .. t+H-1


@dataclass
class FramePairs:
    x_t: torch.Tensor  # float [P, 3, S, S] in [0, 1]
    x_next: torch.Tensor  # float [P, 3, S, S]: x_{t+H}
    latents: torch.Tensor  # long [P, s]: the pair's latent action from the labelled shards
    names: list[str]  # "<clip key> t=<t>"
    clip_index: np.ndarray  # [P]: index of the pair's clip in the clip list


@dataclass
class ActionPairs:
    codes: np.ndarray  # int [N, s]
    actions: np.ndarray  # float32 [N, d]
    clip_ids: np.ndarray  # [N]


def actions_over_offset(actions: np.ndarray, offset: int) -> np.ndarray:
    """Per-step actions [T - 1, d] -> [T - H, d]: row t is the sum of actions t .. t+H-1."""
    cumulative = np.concatenate([np.zeros_like(actions[:1], np.float64), np.cumsum(actions, 0, dtype=np.float64)])
    return (cumulative[offset:] - cumulative[:-offset]).astype(np.float32)  # cumulative [T, d]


def read_labelled_clips(shards_dir: Path, max_clips: int, rng: np.random.Generator) -> tuple[list[LabelledClip], dict]:
    """Up to ``max_clips`` random clips of the set that carry latents; returns them and the skips by reason."""
    manifest = Manifest.read(shards_dir)
    keys = [(shard.name, key) for shard in manifest.shards for key in shard.keys]
    chosen = {keys[i] for i in rng.choice(len(keys), min(max_clips, len(keys)), replace=False)}
    clips, skipped = [], Counter()
    chosen_shards, chosen_keys = {name for name, _ in chosen}, {key for _, key in chosen}
    for parsed in iter_parsed_samples(shards_dir, skipped, shards=chosen_shards, keys=chosen_keys):
        if (parsed.sample.shard, parsed.key) not in chosen:
            continue
        if parsed.latents is None:
            skipped["unlabelled"] += 1
            continue
        offset = parsed.meta.latent_offset
        summed = None if parsed.actions is None else actions_over_offset(parsed.actions, offset)
        clips.append(LabelledClip(parsed.sample, offset, parsed.latents, summed))
    return clips, dict(skipped)


def sample_frame_pairs(clips: list[LabelledClip], count: int, image_size: int, rng: np.random.Generator) -> FramePairs:
    """Up to ``count`` pairs drawn uniformly from all pairs of the clips; each clip is decoded once."""
    clip_of_pair = np.concatenate([np.full(len(clip.latents), i) for i, clip in enumerate(clips)])
    time_of_pair = np.concatenate([np.arange(len(clip.latents)) for clip in clips])
    times_by_clip: dict[int, list[int]] = defaultdict(list)  # clips in random order
    for pair in rng.permutation(len(clip_of_pair))[:count]:
        times_by_clip[int(clip_of_pair[pair])].append(int(time_of_pair[pair]))
    x_t, x_next, latents, names, clip_index = [], [], [], [], []
    for index, times in times_by_clip.items():
        clip, times = clips[index], torch.tensor(times)
        frames = clip_frames(clip.sample, image_size)  # [T, 3, S, S]
        x_t.append(frames[times])
        x_next.append(frames[times + clip.offset])
        latents.append(torch.from_numpy(clip.latents[times.numpy()].astype(np.int64)))
        names += [f"{clip.sample.key} t={t}" for t in times.tolist()]
        clip_index += [index] * len(times)
    return FramePairs(torch.cat(x_t), torch.cat(x_next), torch.cat(latents), names, np.asarray(clip_index))


def distinct_clips_first(clip_index: np.ndarray) -> np.ndarray:
    """Pair order [P] that shows the first pair of every clip before any second pair of a clip."""
    first = np.sort(np.unique(clip_index, return_index=True)[1])
    return np.concatenate([first, np.setdiff1d(np.arange(len(clip_index)), first)])


@torch.no_grad()
def run_in_batches(function, first: torch.Tensor, second: torch.Tensor, device: torch.device,
                   batch_size: int = 64) -> torch.Tensor:
    """function(first[i:j], second[i:j]) on ``device`` for consecutive batches, concatenated on the CPU."""
    outputs = [function(first[i : i + batch_size].to(device), second[i : i + batch_size].to(device)).cpu()
               for i in range(0, len(first), batch_size)]
    return torch.cat(outputs)


def pooled_reconstruction_metrics(x_t: torch.Tensor, x_next: torch.Tensor, prediction: torch.Tensor,
                                  batch_size: int = 64) -> dict[str, float]:
    """reconstruction_metrics of all pairs at once, computed batch by batch: each batch's PSNRs are turned back
    into MSEs and averaged with its pixel count (changed-pixel count for the *_changed ones) as weight."""
    weighted_mse, weights, changed_total = defaultdict(float), defaultdict(float), 0.0
    for start in range(0, len(x_t), batch_size):
        part = slice(start, start + batch_size)
        metrics = {name: float(value) for name, value in reconstruction_metrics(
            x_t[part], x_next[part], prediction[part], CHANGE_THRESHOLD).items()}
        pairs = len(x_t[part])
        changed = metrics.pop("changed_fraction") * pairs  # in units of whole images
        changed_total += changed
        for name, value in metrics.items():
            weight = changed if name.endswith("_changed") else pairs
            weighted_mse[name] += weight * 10 ** (-value / 10)
            weights[name] += weight
    pooled = {name: float(psnr(torch.tensor(weighted_mse[name] / max(weights[name], 1e-12)))) for name in weights}
    return {**pooled, "changed_fraction": changed_total / len(x_t)}


def latent_label(latent_action) -> str:
    return "-".join(str(int(code)) for code in latent_action)


def _show(axis, image: torch.Tensor, title: str = "", **imshow) -> None:
    """image: RGB [3, S, S] in [0, 1], or [S, S] drawn with imshow's cmap / vmin / vmax."""
    axis.imshow((image.permute(1, 2, 0).clamp(0, 1) if image.dim() == 3 else image).numpy(), **imshow)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize=7)


def plot_reconstructions(pairs: FramePairs, prediction: torch.Tensor, path: Path) -> None:
    """Rows of (x_t, x_{t+H}, prediction, |prediction − x_{t+H}|) for up to GRID_ROWS pairs of distinct clips."""
    rows = distinct_clips_first(pairs.clip_index)[:GRID_ROWS]
    error = (prediction[rows].clamp(0, 1) - pairs.x_next[rows]).abs().mean(dim=1)  # [R, S, S]
    scale = max(float(error.max()), 1e-3)
    figure = Figure(figsize=(6.4, 1.6 * len(rows) + 0.4))
    axes = figure.subplots(len(rows), 4, squeeze=False)
    titles = ["x_t", "x_{t+H}", "decode(x_t, own latent)", f"|pred − x_{{t+H}}| (0..{scale:.2f})"]
    for row, pair in enumerate(rows):
        for column, image in enumerate([pairs.x_t[pair], pairs.x_next[pair], prediction[pair]]):
            _show(axes[row, column], image, titles[column] if row == 0 else "")
        _show(axes[row, 3], error[row], titles[3] if row == 0 else "", cmap="magma", vmin=0, vmax=scale)
        axes[row, 0].set_ylabel(f"{pairs.names[pair]}\nlatent {latent_label(pairs.latents[pair])}", fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_atlas(x_t: torch.Tensor, decoded: torch.Tensor, titles: list[str], path: Path) -> None:
    """x_t [R, 3, S, S] in the first column, decoded [R, K, 3, S, S] under latent action k in column k + 1."""
    rows, columns = decoded.shape[:2]
    figure = Figure(figsize=(1.1 * (columns + 1), 1.2 * rows + 0.8))
    axes = figure.subplots(rows, columns + 1, squeeze=False)
    for row in range(rows):
        _show(axes[row, 0], x_t[row], "x_t" if row == 0 else "")
        for column in range(columns):
            _show(axes[row, column + 1], decoded[row, column], titles[column] if row == 0 else "")
    figure.suptitle("x_t decoded under the most frequent latent actions (column: latent action, share of pairs)",
                    fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def action_pairs(clips: list[LabelledClip]) -> ActionPairs | None:
    """The pairs of the clips with true actions (of the first such clip's action_dim); None below 2 such clips."""
    with_actions = [(index, clip) for index, clip in enumerate(clips) if clip.actions is not None]
    if not with_actions:
        return None
    dim = with_actions[0][1].actions.shape[1]
    kept = [(index, clip) for index, clip in with_actions if clip.actions.shape[1] == dim]
    if len(kept) < 2:
        return None
    return ActionPairs(
        codes=np.concatenate([clip.latents for _, clip in kept]).astype(np.int64),
        actions=np.concatenate([clip.actions for _, clip in kept]),
        clip_ids=np.concatenate([np.full(len(clip.latents), index) for index, clip in kept]),
    )


def top_latent_index(codes: np.ndarray, top: np.ndarray) -> np.ndarray:
    """codes [N, s], top latent actions [K, s] -> [N]: the row of ``top`` each pair's latent action is, or -1."""
    matches = (codes[:, None, :] == top[None]).all(axis=-1)  # [N, K]
    return np.where(matches.any(axis=1), matches.argmax(axis=1), -1)


def mean_action_of_latents(pairs: ActionPairs, top: np.ndarray) -> list[list[float] | None]:
    """Mean true action [d] of the pairs of each top latent action (None when none of the pairs read has it)."""
    index = top_latent_index(pairs.codes, top)
    return [pairs.actions[index == k].mean(axis=0).tolist() if (index == k).any() else None for k in range(len(top))]


def action_plane(actions: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """actions [N, d] -> points [N, 2] and axis names: the two dimensions, or the first two principal components."""
    if actions.shape[1] == 1:
        return np.concatenate([actions, np.zeros_like(actions)], axis=1), ("action[0]", "(action is 1-D)")
    if actions.shape[1] == 2:
        return actions, ("action[0]", "action[1]")
    centred = actions - actions.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    explained = singular**2 / max((singular**2).sum(), 1e-12)
    names = (f"PC1 ({explained[0]:.0%} of variance)", f"PC2 ({explained[1]:.0%} of variance)")
    return centred @ components[:2].T, names


def plot_actions_by_latent(pairs: ActionPairs, top: np.ndarray, rng: np.random.Generator, path: Path) -> None:
    """Scatter of the true actions, the top latent actions coloured and the rest grey."""
    points, (x_name, y_name) = action_plane(pairs.actions.astype(np.float64))
    points = points + rng.normal(0, 0.01, points.shape) * (np.ptp(points, axis=0) + 1e-9)  # many pairs coincide
    index = top_latent_index(pairs.codes, top)
    figure = Figure(figsize=(6.4, 5))
    axis = figure.subplots()
    rest = index < 0
    axis.scatter(*points[rest].T, s=5, color="lightgrey", label=f"other ({rest.mean():.0%})")
    palette = matplotlib.colormaps["tab10" if len(top) <= 10 else "tab20"]
    for k, latent in enumerate(top):
        mine = index == k
        axis.scatter(*points[mine].T, s=5, color=palette(k), label=f"{latent_label(latent)} ({mine.mean():.0%})")
    axis.set_xlabel(x_name)
    axis.set_ylabel(y_name)
    axis.set_title("true action of each pair (sum over its H steps; jittered by 1% of the range)\n"
                   "coloured by latent action, share of the pairs in brackets", fontsize=8)
    axis.legend(fontsize=6, markerscale=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def reconstruction_section(model: LAQ, clips: list[LabelledClip], count: int, rng: np.random.Generator,
                           device: torch.device, out_dir: Path) -> tuple[dict, FramePairs]:
    """Metrics of decode(x_t, own latent action) over up to ``count`` random pairs, and the reconstruction grid."""
    pairs = sample_frame_pairs(clips, count, model.config.image_size, rng)
    prediction = run_in_batches(model.decode, pairs.x_t, pairs.latents, device)  # [P, 3, S, S]
    encoded = run_in_batches(model.encode, pairs.x_t, pairs.x_next, device)  # [P, s]
    plot_reconstructions(pairs, prediction, out_dir / FIGURES["reconstructions"])
    section = {
        "pairs": len(pairs.x_t),
        **pooled_reconstruction_metrics(pairs.x_t, pairs.x_next, prediction),
        # below 1 when the shards were labelled by another checkpoint or preprocessing than this LAQ
        "labels_match_model": float((encoded == pairs.latents).all(dim=1).float().mean()),
    }
    return section, pairs


def codebook_section(shards_dir: Path, codebook_size: int, top_k: int) -> dict:
    """Code usage and the most frequent latent actions over the whole labelled set."""
    distribution = latent_distribution(shards_dir, top=top_k)
    per_position = distribution["per_position_code_fraction"]  # [{code: fraction}] per position
    return {
        "codebook_size": codebook_size,
        "codes_used": len(set().union(*per_position)),
        "codes_used_per_position": [len(position) for position in per_position],
        "pairs": distribution["pairs"],
        "distinct_latent_actions": distribution["distinct_latent_actions"],
        "top": distribution["top"],
    }


def atlas_section(model: LAQ, pairs: FramePairs, codebook: dict, mean_actions: list | None, device: torch.device,
                  out_dir: Path) -> None:
    """ATLAS_ROWS x_t of distinct clips, each decoded under each top latent action."""
    rows = distinct_clips_first(pairs.clip_index)[:ATLAS_ROWS]
    x_t = pairs.x_t[rows]  # [R, 3, S, S]
    top = torch.tensor([row["latent_action"] for row in codebook["top"]])  # [K, s]
    decoded = run_in_batches(model.decode, x_t.repeat_interleave(len(top), 0), top.repeat(len(rows), 1), device)
    titles = []
    for k, row in enumerate(codebook["top"]):
        title = f"{latent_label(row['latent_action'])}\n{row['fraction']:.1%}"
        if mean_actions is not None and mean_actions[k] is not None:
            title += "\nΔ≈(" + ", ".join(f"{value:+.1f}" for value in mean_actions[k][:3]) + ")"
        titles.append(title)
    plot_atlas(x_t, decoded.unflatten(0, (len(rows), len(top))), titles, out_dir / FIGURES["atlas"])


def action_section(clips: list[LabelledClip], codebook: dict, rng: np.random.Generator, out_dir: Path) -> dict | None:
    """Probes of the true actions and the scatter plot; None when fewer than 2 clips carry actions."""
    pairs = action_pairs(clips)
    if pairs is None:
        return None
    top = np.array([row["latent_action"] for row in codebook["top"]])  # [K, s]
    plot_actions_by_latent(pairs, top, rng, out_dir / FIGURES["actions"])
    purity = purity_probe(pairs.codes, pairs.actions, bins=len(top), rng=rng)
    probe = linear_probe(pairs.codes, pairs.actions, pairs.clip_ids, codebook["codebook_size"], rng)
    return {
        "target": "sum of the actions t .. t+H-1",
        "action_dim": int(pairs.actions.shape[1]),
        "pairs": len(pairs.codes),
        "clips": len(np.unique(pairs.clip_ids)),
        "mean_action_of_top_latents": mean_action_of_latents(pairs, top),
        "purity": {**purity, "binning": f"k-means with k = {len(top)} (the top latent actions) on z-scored actions",
                   "chance_is": "latent actions permuted across pairs, keeping the cluster sizes"},
        "linear_probe": {**probe, "features": "per-position one-hot of the codes (s·|C|)",
                         "split": "80% / 20% of the clips", "chance_is": "codes permuted across pairs"},
    }


VERDICT_QUESTIONS = {
    "closer_to_next_than_to_t": "Prediction closer to x_{t+H} than to x_t?",
    "beats_copy_on_changed_pixels": "Prediction beats copying x_t on the changed pixels?",
    "codebook_used": f"At least {MIN_CODES_USED_FRACTION:.0%} of the codes used?",
    "purity_above_chance": "Latent-action clusters purer than chance?",
    "linear_probe_above_chance": "Linear probe of the true action above chance?",
}


def verdicts(reconstruction: dict, codebook: dict, actions: dict | None) -> dict[str, dict]:
    """One {"pass": bool or None (cannot tell), "detail": str} per VERDICT_QUESTIONS entry."""
    r, size = reconstruction, codebook["codebook_size"]
    needed = math.ceil(MIN_CODES_USED_FRACTION * size)
    closer = f"PSNR vs x_{{t+H}} {r['psnr_next']:.2f} dB, vs x_t {r['psnr_t']:.2f} dB"
    copy = f"changed pixels: prediction {r['psnr_next_changed']:.2f} dB, copy {r['psnr_copy_changed']:.2f} dB"
    checks = {
        "closer_to_next_than_to_t": (r["psnr_next"] > r["psnr_t"], closer),
        "beats_copy_on_changed_pixels": (r["psnr_next_changed"] > r["psnr_copy_changed"], copy),
        "codebook_used": (codebook["codes_used"] >= needed, f"{codebook['codes_used']} of {size} codes used"),
        "purity_above_chance": (None, "no true actions in the shards"),
        "linear_probe_above_chance": (None, "no true actions in the shards"),
    }
    if actions is not None:
        purity, probe = actions["purity"], actions["linear_probe"]
        purity_chance, probe_chance = purity["chance"], probe["chance"]
        checks["purity_above_chance"] = (
            purity["above_chance"],
            f"purity {purity['purity']:.3f}, chance {purity_chance['mean']:.3f} ± {purity_chance['std']:.3f}",
        )
        checks["linear_probe_above_chance"] = (
            probe["above_chance"],
            f"held-out R² {probe['r2_mean']:.3f}, chance {probe_chance['mean']:.3f} ± {probe_chance['std']:.3f}",
        )
    return {name: {"pass": None if passed is None else bool(passed), "detail": detail}
            for name, (passed, detail) in checks.items()}


def _markdown_verdicts(report: dict) -> list[str]:
    marks = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = ["## Verdicts", ""]
    for name, verdict in report["verdicts"].items():
        lines.append(f"- **{marks[verdict['pass']]}** {VERDICT_QUESTIONS[name]} {verdict['detail']}")
    return lines + [""]


def _markdown_reconstruction(report: dict) -> list[str]:
    r = report["reconstruction"]
    method = (
        f"decode(x_t, the pair's latent action from the shards) on {r['pairs']} random pairs, PSNR (dB) pooled over "
        f"the pairs. Changed pixels: |x_{{t+H}} − x_t| > {CHANGE_THRESHOLD} in some channel "
        f"({r['changed_fraction']:.1%} of the pixels)."
    )
    return [
        "## 1. Reconstruction", "", method, "",
        "| PSNR (dB) | all pixels | changed pixels |", "|---|---|---|",
        f"| prediction vs x_{{t+H}} | {r['psnr_next']:.2f} | {r['psnr_next_changed']:.2f} |",
        f"| prediction vs x_t | {r['psnr_t']:.2f} | |",
        f"| copy x_t vs x_{{t+H}} (baseline) | {r['psnr_copy']:.2f} | {r['psnr_copy_changed']:.2f} |", "",
        f"The shards' latent actions equal this LAQ's encoding for {r['labels_match_model']:.1%} of these pairs.", "",
        f"![reconstructions]({FIGURES['reconstructions']})", "",
    ]


def _markdown_codebook(report: dict) -> list[str]:
    c, actions = report["codebook"], report["actions"]
    means = actions["mean_action_of_top_latents"] if actions else [None] * len(c["top"])
    per_position = ", ".join(map(str, c["codes_used_per_position"]))
    usage = (
        f"{c['codes_used']} of {c['codebook_size']} codes used (per position: {per_position}); "
        f"{c['distinct_latent_actions']} distinct latent actions over the {c['pairs']} labelled pairs."
    )
    lines = ["## 2. Codebook and latent-action atlas", "", usage, "",
             "| latent action | share of pairs | mean true action over H |", "|---|---|---|"]
    for row, mean in zip(c["top"], means):
        shown = "" if mean is None else "(" + ", ".join(f"{value:+.3g}" for value in mean) + ")"
        lines.append(f"| {latent_label(row['latent_action'])} | {row['fraction']:.1%} | {shown} |")
    return lines + ["", f"![atlas]({FIGURES['atlas']})", ""]


def _markdown_actions(report: dict) -> list[str]:
    a = report["actions"]
    lines = ["## 3. Latent actions vs true actions", ""]
    if a is None:
        return lines + ["Fewer than 2 clips carry true actions: no probes.", ""]
    purity, probe = a["purity"], a["linear_probe"]
    target = (f"True action of the pair (t, t + H): the {a['target']} ({a['action_dim']}-D; {a['pairs']} pairs of "
              f"{a['clips']} clips).")
    purity_text = (
        f"**Cluster purity** (bins: {purity['binning']}; clusters: the {purity['clusters']} distinct latent actions): "
        f"purity {purity['purity']:.3f}; chance ({purity['chance_is']}) {purity['chance']['mean']:.3f} ± "
        f"{purity['chance']['std']:.3f} (max {purity['chance']['max']:.3f}); gain over chance "
        f"(purity − chance) / (1 − chance) = {purity['gain_over_chance']:.3f}."
    )
    probe_text = (
        f"**Linear probe** (ridge, alpha {probe['alpha']}, on the {probe['features']}; {probe['split']}: "
        f"{probe['train_pairs']} training / {probe['test_pairs']} held-out pairs). Held-out R²; chance: "
        f"{probe['chance_is']}."
    )
    lines += [target, "", f"![actions by latent]({FIGURES['actions']})", "", purity_text, "", probe_text, "",
              "| action dimension | R² | chance R² |", "|---|---|---|"]
    for dim, (r2, chance) in enumerate(zip(probe["r2_per_dim"], probe["chance_r2_per_dim"])):
        lines.append(f"| {dim} | {_number(r2)} | {_number(chance)} |")
    shuffled = probe["chance"]
    lines.append(f"| mean | {_number(probe['r2_mean'])} | {shuffled['mean']:.3f} ± {shuffled['std']:.3f} |")
    return lines + [""]


def _number(value: float | None) -> str:
    """A report number to 3 decimals; None (NaN in the probe: constant held-out dimension) as n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def markdown_report(report: dict) -> str:
    laq, data = report["laq"], report["data"]
    offsets = ", ".join(map(str, data["offsets"]))
    header = (
        f"LAQ `{laq['run_dir']}` ({laq['checkpoint']}; {laq['image_size']} px, |C| = {laq['codebook_size']}, "
        f"s = {laq['code_seq_len']}). Labelled shards `{data['shards']}`: {data['clips_read']} clips read "
        f"(skipped: {data['clips_skipped'] or 'none'}), H = {offsets}, seed {data['seed']}."
    )
    sections = ["# LAQ report: are the latent actions actions, or just compression?", "", header, ""]
    sections += _markdown_verdicts(report) + _markdown_reconstruction(report)
    return "\n".join(sections + _markdown_codebook(report) + _markdown_actions(report))


def json_safe(value):
    """The report with NaN / inf (e.g. R² of a constant action dimension) as null, so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def check_labels_fit(model: LAQ, clips: list[LabelledClip], shards_dir: Path) -> None:
    if not clips:
        raise ValueError(f"{shards_dir}: no labelled clips; label the shards with launch/label.py first")
    config = model.config
    for clip in clips:
        if clip.latents.shape[1] != config.code_seq_len or clip.latents.max() >= config.codebook_size:
            raise ValueError(f"{clip.sample.key}: latents of shape {clip.latents.shape} with codes up to "
                             f"{clip.latents.max()} do not fit this LAQ (s = {config.code_seq_len}, "
                             f"|C| = {config.codebook_size}); were the shards labelled with another LAQ?")


def build_report(laq_dir: str | Path, shards_dir: str | Path, out_dir: str | Path, max_clips: int = 256,
                 pairs: int = 256, top_k: int = 8, seed: int = 0, device: torch.device | None = None) -> dict:
    """Write the figures, report.md and report.json to ``out_dir``; returns the report's numbers."""
    shards_dir, out_dir = Path(shards_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, checkpoint = load_trained_laq(str(laq_dir), device)
    clips, skipped = read_labelled_clips(shards_dir, max_clips, np.random.default_rng([seed, 0]))
    check_labels_fit(model, clips, shards_dir)
    codebook = codebook_section(shards_dir, model.config.codebook_size, top_k)
    reconstruction, frame_pairs = reconstruction_section(model, clips, pairs, np.random.default_rng([seed, 1]),
                                                         device, out_dir)
    actions = action_section(clips, codebook, np.random.default_rng([seed, 2]), out_dir)
    atlas_section(model, frame_pairs, codebook, actions and actions["mean_action_of_top_latents"], device, out_dir)
    c = model.config
    report = {
        "laq": {"run_dir": str(laq_dir), "checkpoint": checkpoint, "image_size": c.image_size,
                "codebook_size": c.codebook_size, "code_seq_len": c.code_seq_len},
        "data": {"shards": str(shards_dir), "clips_read": len(clips), "clips_skipped": skipped,
                 "offsets": sorted({clip.offset for clip in clips}), "max_clips": max_clips, "seed": seed},
        "reconstruction": reconstruction,
        "codebook": codebook,
        "actions": actions,
        "verdicts": verdicts(reconstruction, codebook, actions),
        "figures": {name: file for name, file in FIGURES.items() if name != "actions" or actions is not None},
    }
    report = json_safe(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (out_dir / "report.md").write_text(markdown_report(report))
    return report
