"""`diffusionvl convert SRC DST`: translate an AR checkpoint (or a tiny random one) into a diffusion checkpoint.

Contract: reads SRC (a local folder or hub id of a supported architecture, or `--tiny ARCH` for a tiny random
model built offline), adds/finds the mask token, records the diffusion settings and writes DST atomically.
Prints what it did; errors are one line.
"""

from __future__ import annotations

import argparse
import json

from diffusionvl.core.errors import DiffusionVLError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusionvl.backbone.tiny import TINY_ARCHS

    parser.add_argument("src", nargs="?", help="AR model: checkpoint folder or hub id (omit with --tiny)")
    parser.add_argument("dst", help="output folder of the diffusion model")
    parser.add_argument("--tiny", choices=TINY_ARCHS, help="convert a tiny random model of this architecture")
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens per block B (default: the source's recorded value, else 8)")
    parser.add_argument("--mask-token", default=None, help="mask token name (default: an existing one, else <|mask|>)")
    parser.add_argument("--prediction", choices=["shift", "same"], default=None,
                        help="which position's logits predict token i (default: the source's, else shift = as AR)")
    parser.add_argument("--eos-token", default=None, help="end-of-answer token name (default: from the chat template)")
    parser.add_argument("--dtype", default=None, help="weights dtype to save (default: keep the source dtype)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny random model (with --tiny)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST even when it is a file or a folder that is not a diffusionvl model")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    from diffusionvl.core.atomic import check_target
    from diffusionvl.model.conversion import convert
    from diffusionvl.model.modeling import MODEL_MARKER, save_atomic
    from diffusionvl.model.wrapping import wrap

    if args.tiny:
        if args.src is not None:
            raise DiffusionVLError("give either SRC or --tiny ARCH, not both")
        from diffusionvl.backbone.tiny import make_tiny

        check_target(args.dst, MODEL_MARKER, args.overwrite)
        if not 0 <= args.seed < 2 ** 63:
            raise DiffusionVLError(f"--seed must be in 0..{2 ** 63 - 1}, got {args.seed}")
        hf_model, processor = make_tiny(args.tiny, seed=args.seed)
        model = wrap(hf_model, processor, block_size=args.block_size, mask_token=args.mask_token,
                     prediction=args.prediction, eos_token=args.eos_token, new_conversion=True)
        path = save_atomic(model, args.dst, overwrite=args.overwrite)
    else:
        if args.src is None:
            raise DiffusionVLError("missing SRC: give an AR checkpoint folder or hub id, or --tiny ARCH")
        path = convert(args.src, args.dst, block_size=args.block_size, mask_token=args.mask_token,
                       prediction=args.prediction, eos_token=args.eos_token, dtype=args.dtype,
                       overwrite=args.overwrite)
    with open(path / "diffusionvl.json", encoding="utf-8") as fh:
        summary = {"output": str(path), **json.load(fh)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {path}  (block_size={summary['block_size']}, mask_token={summary['mask_token']}, "
              f"eos_token={summary['eos_token']}, prediction={summary['prediction']})")
    return 0
