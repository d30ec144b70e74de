"""`diffusionvl data`: generate the synthetic visual QA dataset (LLaVA JSON for training, JSONL for evaluation).

Contract: `add_arguments(parser)` declares the flags; `run(args)` calls `diffusionvl.data.synth.generate_dataset`,
prints one line per question type with its count in each split, and returns 0. Bad values surface as a one-line
`DiffusionVLError` (the CLI prints it and exits with status 2).
"""

from __future__ import annotations

import argparse
import time

from diffusionvl.core.errors import DiffusionVLError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="Output directory (created if needed).")
    parser.add_argument("--n-train", type=int, default=1000, help="Training samples (train.json).")
    parser.add_argument("--n-val", type=int, default=100, help="Validation samples (val.json).")
    parser.add_argument("--n-test", type=int, default=200, help="Test samples (test.jsonl, exact-match answers).")
    parser.add_argument("--seed", type=int, default=0, help="Random seed; the same seed writes identical files.")
    parser.add_argument("--image-size", type=int, default=224, help="Side of the square images, in pixels.")
    parser.add_argument("--no-real-images", action="store_true",
                        help="Only synthetic scenes (no scikit-image / matplotlib photographs).")
    parser.add_argument("--real-fraction", type=float, default=0.05,
                        help="Share of the image samples that show a real photograph, in [0, 1].")
    parser.add_argument("--text-only-fraction", type=float, default=0.0,
                        help="Share of text-only samples (no image), in [0, 1].")
    parser.add_argument("--multi-turn-fraction", type=float, default=0.25,
                        help="Share of training samples with several questions about the same image, in [0, 1].")
    parser.add_argument("--questions-per-image", type=int, default=2,
                        help="Questions a multi-turn training sample asks about its image (1..32; fewer when the scene "
                             "runs out of questions whose answers the earlier turns do not name).")
    parser.add_argument("--max-objects", type=int, default=4,
                        help="Most objects per synthetic scene (1..4; 1 = one-object recognition scenes).")
    parser.add_argument("--task-mix", default=None, metavar="TYPE=W,...",
                        help="Relative weights of the synthetic question types, e.g. 'count=2,text=1' "
                             "(types: shape, colour, count, position, relation, text, exist; default: equal).")
    parser.add_argument("--no-progress", action="store_true", help="Do not show a progress bar.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Write into a non-empty --out that holds no earlier dataset (same-named files replaced).")


def parse_task_mix(text: str | None) -> dict[str, float] | None:
    """'count=2,text=1' -> {'count': 2.0, 'text': 1.0}; types are checked by the generator."""
    if text is None:
        return None
    mix: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, weight = item.partition("=")
        try:
            mix[name.strip()] = float(weight) if sep else 1.0
        except ValueError:
            raise DiffusionVLError(f"--task-mix item {item!r} is not TYPE=WEIGHT with a numeric weight") from None
    return mix


def run(args: argparse.Namespace) -> int:
    from diffusionvl.data.synth import SPLITS, generate_dataset

    start = time.perf_counter()
    summary = generate_dataset(
        args.out, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, seed=args.seed,
        image_size=args.image_size, task_mix=parse_task_mix(args.task_mix), real_images=not args.no_real_images,
        real_fraction=args.real_fraction, text_only_fraction=args.text_only_fraction,
        multi_turn_fraction=args.multi_turn_fraction, progress=not args.no_progress, overwrite=args.overwrite,
        questions_per_image=args.questions_per_image, max_objects=args.max_objects,
    )
    seconds = time.perf_counter() - start
    print(format_table(summary, SPLITS))
    images = sum(summary["images"].values())
    print(f"wrote {args.out}: {sum(summary['samples'].values())} samples, {images} images in {seconds:.1f} s")
    return 0


def format_table(summary: dict, splits: tuple[str, ...]) -> str:
    """Questions per type and split (types that never occur are left out), with a total row."""
    counts = summary["questions"]
    types = [t for t in counts[splits[0]] if any(counts[s][t] for s in splits)]
    width = max([len("question type"), *map(len, types)])
    lines = [f"{'question type':<{width}}" + "".join(f"{s:>8}" for s in splits)]
    for qtype in types:
        lines.append(f"{qtype:<{width}}" + "".join(f"{counts[s][qtype]:>8}" for s in splits))
    lines.append(f"{'total':<{width}}" + "".join(f"{sum(counts[s].values()):>8}" for s in splits))
    return "\n".join(lines)
