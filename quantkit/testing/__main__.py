"""python -m quantkit.testing OUT [--preset P] [--fp8] [--fused-experts] [--no-mtp]: write a tiny model."""

import argparse

from quantkit.testing.factory import PRESETS, make_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m quantkit.testing", description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--preset", default="llama", choices=sorted(PRESETS))
    parser.add_argument("--fp8", action="store_true", help="DeepSeek FP8 layout (deepseek_v3 presets)")
    parser.add_argument("--fused-experts", action="store_true", help="routed experts as transformers >= 5 saves them")
    parser.add_argument("--no-mtp", action="store_true", help="leave out DeepSeek's multi-token-prediction layer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = make_tiny_model(args.out, args.preset, fp8=args.fp8, fused_experts=args.fused_experts,
                             mtp=not args.no_mtp, seed=args.seed)
    print(folder)


if __name__ == "__main__":
    main()
