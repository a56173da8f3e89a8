"""Write eval/tasks/stdlib_nextline.jsonl: python -m eval.make_tasks [--count N] [--seed S]."""

import argparse
import json
from pathlib import Path

from quantkit.bundled import textsets
from quantkit.bundled.tasks import next_line_items

OUT = Path(__file__).resolve().parent / "tasks" / "stdlib_nextline.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    items = next_line_items(args.count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    print(f"{len(items)} items from Python {textsets.python_version()} held-out text -> {args.out}")


if __name__ == "__main__":
    main()
