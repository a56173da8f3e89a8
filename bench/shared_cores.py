"""`quantkit eval` on cores shared with another busy process: OpenMP's spinning wait vs the passive wait that
quantkit sets (quantkit/__init__.py), and one torch thread instead of one per core.

    python bench/shared_cores.py [--repeat 1] [--windows 40] [--mc-items 100] [--ctx 256]

The bundled tiny-qwen2 is converted to a Q8_0 GGUF (not timed); then, each in a fresh process,
`quantkit eval Q8_0.gguf --baseline tiny-qwen2 --backend torch --ctx 256 --windows 40 --mc-items 100` runs
(torch's forward for both variants), once on otherwise idle cores and once beside one CPU-bound Python process
(`while True: pass`), with three settings:

* spinning: OpenMP's default wait (libgomp spins for a while at every barrier before it sleeps). torch is
  imported before quantkit, so the OpenMP runtime has read its environment before quantkit sets the policy:
  `python -c "import torch; from quantkit.cli import main; main()" eval ...`;
* passive: `python -m quantkit.cli eval ...`, OMP_WAIT_POLICY=PASSIVE as quantkit sets it;
* passive, 1 thread: the same with OMP_NUM_THREADS=1 (torch's intra-op threads: 1 instead of one per core).

Reported: wall time (best of --repeat) of each, and the ratios beside-busy / idle and spinning / passive.
PASS when eval with quantkit's setting (passive) beside the busy process takes at most 2x its idle time; the
exit status is 1 otherwise. Results: bench/results/shared_cores.{json,md}. Other work on the machine adds
noise: the 1-minute load average before each run is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from read_memory import REPO, _machine, write_results

DEFAULT_JSON = REPO / "bench" / "results" / "shared_cores.json"
DEFAULT_MD = REPO / "bench" / "results" / "shared_cores.md"
SPINNING = [sys.executable, "-c", "import torch; from quantkit.cli import main; main()"]
QUANTKIT = [sys.executable, "-m", "quantkit.cli"]
SETTINGS = {  # name -> (command prefix, extra environment)
    "spinning": (SPINNING, {}),
    "passive": (QUANTKIT, {}),
    "passive, 1 thread": (QUANTKIT, {"OMP_NUM_THREADS": "1"}),
}
BUSY = [sys.executable, "-c", "while True: pass"]


def _environment(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


def _run_eval(prefix: list[str], extra: dict, args: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(prefix + args, env=_environment(extra), check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    return time.perf_counter() - began


def _markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# `quantkit eval` on shared cores", "",
             f"Date: {report['date']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}  ",
             f"Command: `{report['command']}`  ",
             f"Eval: `quantkit {' '.join(report['eval_args'])}` (torch backend: quantkit's forward for the "
             "baseline and the Q8_0 GGUF), each run in a fresh process, best of "
             f"{report['repeat']}; busy = one `while True: pass` Python process beside it.", "",
             "| setting | idle | beside 1 busy process | busy / idle | load avg before (idle, busy) |",
             "|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['idle_s']:.1f} s | {r['busy_s']:.1f} s | {r['busy_over_idle']:.2f} | "
                     f"{r['load_idle']:.1f}, {r['load_busy']:.1f} |")
    s = report["results"]["spinning"]
    p = report["results"]["passive"]
    loads = [r[k] for r in report["results"].values() for k in ("load_idle", "load_busy")]
    if max(loads) > m["cores"]:
        lines += ["", f"The 1-minute load average exceeded the {m['cores']} cores: other work was running, so "
                  "'idle' means without the added busy process, and times are longer than on a quiet machine."]
    lines += ["", f"Spinning / passive: idle {s['idle_s'] / p['idle_s']:.2f}, beside the busy process "
              f"{s['busy_s'] / p['busy_s']:.2f} (> 1: the passive wait is faster).",
              f"{'PASS' if report['pass'] else 'FAIL'}: passive beside the busy process / idle = "
              f"{p['busy_over_idle']:.2f} (at most 2)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--mc-items", type=int, default=100)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--out", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--md", type=Path, default=DEFAULT_MD)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qk-shared-cores-"))
    try:
        target = work / "tiny-qwen2-Q8_0.gguf"
        subprocess.run(QUANTKIT + ["convert", "tiny-qwen2", "--to", "gguf:Q8_0", "-o", str(target)],
                       env=_environment({}), check=True, stdout=subprocess.DEVNULL)
        eval_args = ["eval", str(target), "--baseline", "tiny-qwen2", "--backend", "torch", "--ctx", str(args.ctx),
                     "--windows", str(args.windows), "--mc-items", str(args.mc_items), "-o", str(work / "report")]
        results = {}
        for name, (prefix, extra) in SETTINGS.items():
            r = {}
            for load in ("idle", "busy"):
                busy = subprocess.Popen(BUSY) if load == "busy" else None
                try:
                    r[f"load_{load}"] = os.getloadavg()[0]
                    r[f"{load}_s"] = min(_run_eval(prefix, extra, eval_args) for _ in range(args.repeat))
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
                print(f"{name}, {load}: {r[f'{load}_s']:.1f} s", flush=True)
            r["busy_over_idle"] = r["busy_s"] / r["idle_s"]
            results[name] = r
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "command": "python bench/shared_cores.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "machine": _machine(), "repeat": args.repeat,
                  "eval_args": [a if not a.startswith(str(work)) else Path(a).name for a in eval_args],
                  "results": results, "pass": results["passive"]["busy_over_idle"] <= 2.0}
        print(_markdown(report))
        return write_results(report, _markdown(report), args.out, args.md)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
