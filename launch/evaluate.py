"""Closed-loop evaluation of a policy on Meta-World's "eval" layouts (never the training ones).

    python launch/evaluate.py --policy expert --env metaworld --tasks MT10 --episodes 10 --seed 0 \\
        --processes 2 --out runs/eval_expert

--policy: "expert" (scripted experts; privileged, they read the simulator state), "random"
(uniform actions), or a policy directory written by tools/export.py (a finetuned VLA; each process loads
it on the CPU). A trained policy is shown the camera and render resolution of its training data (recorded
at export); --camera/--resolution must agree or be left out. Prints the markdown table; with --out also
writes results.json, results.md and videos/ (first --videos episodes per task).
"""

import argparse
import functools
import sys
from pathlib import Path

from lapa_dist.envs.metaworld import CAMERAS, DEFAULT_CAMERA, MAX_EPISODE_STEPS, resolve_tasks
from lapa_dist.eval.closed_loop import ScriptedExpertPolicy, UniformRandomPolicy, evaluate


def policy_factory(name: str, seed: int):
    if name == "expert":
        return ScriptedExpertPolicy
    if name == "random":
        return functools.partial(UniformRandomPolicy, seed=seed)
    if Path(name).is_dir():
        from lapa_dist.policy import Policy

        return functools.partial(Policy.from_pretrained, name, device="cpu")
    raise ValueError(f"policy {name!r}: expected expert, random or a policy directory (tools/export.py)")


def observation_settings(args) -> tuple[str, int]:
    """(camera, resolution): a trained policy's training observation, checked against the flags."""
    defaults = (DEFAULT_CAMERA, 64)
    if not Path(args.policy).is_dir():
        return args.camera or defaults[0], args.resolution or defaults[1]
    from lapa_dist.policy import read_policy_description

    observation = read_policy_description(args.policy)["observation"]
    trained = (observation["camera"], observation["width"])
    for flag, given, expected in (("--camera", args.camera, trained[0]), ("--resolution", args.resolution,
                                                                          trained[1])):
        if given is not None and given != expected:
            raise ValueError(f"{flag} {given}: the policy was trained on {expected} ({args.policy}/policy.json)")
    if observation["width"] != observation["height"]:
        raise ValueError(f"the policy was trained on {observation['width']}x{observation['height']} frames; "
                         "Meta-World renders square frames")
    return trained


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="expert, random, or a trained policy directory")
    parser.add_argument("--env", default="metaworld", choices=["metaworld"])
    parser.add_argument("--tasks", default="MT10", help="MT10, MT50, or comma-separated task names")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per task")
    parser.add_argument("--seed", type=int, default=0, help="eval layout seed (and the random policy's)")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--camera", choices=CAMERAS, help=f"default: the policy's, else {DEFAULT_CAMERA}")
    parser.add_argument("--resolution", type=int, help="render size; default: the policy's, else 64")
    parser.add_argument("--max-steps", type=int, default=200, help=f"episode cap (at most {MAX_EPISODE_STEPS})")
    parser.add_argument("--videos", type=int, default=1, help="mp4s per task (first episodes), with --out")
    parser.add_argument("--out", help="directory for results.json, results.md and videos/")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        factory = policy_factory(args.policy, args.seed)
        camera, resolution = observation_settings(args)
        tasks = resolve_tasks(args.tasks)
        results = evaluate(factory, tasks, args.episodes, args.seed, camera, resolution, args.max_steps,
                           args.processes, video_dir=Path(args.out) / "videos" if args.out else None,
                           videos_per_task=args.videos)
    except (ValueError, FileNotFoundError) as error:
        print(f"evaluate: {error}", file=sys.stderr)
        return 2
    if args.out:
        results.write(args.out)
    print(results.to_markdown(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
