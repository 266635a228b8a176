"""Start-up of the command line, an older commit against this tree in one run: --help, predict --help, predict.

    python benchmarks/startup.py                    # 5 runs of each, d207dd0 (before lazy imports) against this tree
    python benchmarks/startup.py --runs 9 --before HEAD~1

Each arm is a `src` folder put first on PYTHONPATH: `--before`'s, extracted with `git archive` into a temporary
folder, and this tree's. The commands are the installed `kosmos-serve` script's: `kosmos-serve --help`,
`kosmos-serve predict --help`, and `kosmos-serve predict examples/scene-four-shapes.png --model demo` (a caption
from the demo model shipped in the package). The arms take turns, run after run, so a shared machine's noise falls
on both alike; each figure is the median of `--runs`: wall-clock seconds, and in brackets the CPU seconds the process
spent (user + system), which the load other programs put on the machine moves much less.

- **Total**: from just before the process is started until it has ended.
- **Start to work** (predict): from just before the process is started until `Engine.run` is called with the image,
  read, checked and decoded, and the model loaded: the interpreter, the command line, every import, the settings,
  the image and the model's weights. What is left is the model's own work (the vision pass, generation, parsing,
  scoring) and printing. The moment is printed by the predict process itself: it runs the same `main` as the
  `kosmos-serve` script, from `python -c`, with `Engine.run` wrapped as its module is imported (STAMPED_MAIN).
- **Floor**: a bare `python -c` importing torch and transformers' Kosmos-2 model and processor, which any predict
  needs before it can load the model, until those imports are done (the same moment's kind as start to work); the
  same for both arms.

The report (markdown) goes to stdout, each run's figures to stderr.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = Path("examples") / "scene-four-shapes.png"
STAMP = "engine-run-at"
FLOOR = "import torch; from transformers import AutoProcessor, Kosmos2ForConditionalGeneration, Kosmos2Processor"
PRINT_STAMP = f"print('{STAMP}', time.monotonic(), time.process_time(), file=sys.stderr, flush=True)"

STAMPED_MAIN = f"""
import sys, time
from importlib.machinery import PathFinder

class StampEngineRun:
    # Wraps Engine.run as kosmos_serve.engine.engine is imported: it prints the moment it is called.
    def find_spec(self, name, path=None, target=None):
        if name != "kosmos_serve.engine.engine":
            return None
        spec = PathFinder.find_spec(name, path)
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            run = module.Engine.run

            def stamped_run(engine, *args, **kwargs):
                {PRINT_STAMP}
                return run(engine, *args, **kwargs)

            module.Engine.run = stamped_run

        spec.loader.exec_module = exec_and_wrap
        return spec

sys.meta_path.insert(0, StampEngineRun())
sys.argv[0] = "kosmos-serve"
from kosmos_serve.cli import main
main()
"""

ROWS = [  # (what, target, the figure's key)
    ("`kosmos-serve --help`", "< 1 s", "help"),
    ("`kosmos-serve predict --help`", "", "predict --help"),
    ("`kosmos-serve predict ... --model demo`: start to work", "< 2 s", "predict: start to work"),
    ("`kosmos-serve predict ... --model demo`: total", "", "predict: total"),
]


def timed(command: list[str], env: dict) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """(wall, CPU) seconds of `command` until it ended, and until it printed STAMP (None if it did not)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    end = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode:
        raise SystemExit(f"{' '.join(command[:3])} ... failed ({run.returncode}):\n{run.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    stamps = [line.split()[1:] for line in run.stderr.splitlines() if line.startswith(STAMP)]
    return (end - start, cpu), (float(stamps[0][0]) - start, float(stamps[0][1])) if stamps else None


def measure(script: str, env: dict) -> dict[str, tuple[float, float]]:
    """One run of each command of one arm: (wall, CPU) seconds of each figure."""
    help_seconds, _ = timed([script, "--help"], env)
    predict_help, _ = timed([script, "predict", "--help"], env)
    total, to_work = timed([sys.executable, "-c", STAMPED_MAIN, "predict", str(IMAGE), "--model", "demo"], env)
    if to_work is None:
        raise SystemExit("predict ended without calling Engine.run")
    return {"help": help_seconds, "predict --help": predict_help, "predict: start to work": to_work,
            "predict: total": total}


def median(figures: list[tuple[float, float]]) -> str:
    """`wall s (CPU s)`, each the median."""
    return (f"{statistics.median(wall for wall, _ in figures):.2f} s "
            f"({statistics.median(cpu for _, cpu in figures):.2f} s)")


def arm_environment(source: Path) -> dict:
    """The environment that imports kosmos_serve from `source`, checked."""
    env = dict(os.environ, PYTHONPATH=str(source), HF_HUB_OFFLINE="1")
    found = subprocess.run([sys.executable, "-c", "import kosmos_serve.cli; print(kosmos_serve.cli.__file__)"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(str(source)):
        raise SystemExit(f"with PYTHONPATH={source}, kosmos_serve comes from {found}")
    return env


def extract_source(commit: str, into: Path) -> Path:
    """The `src` folder of `commit`, read with `git archive` (nothing in the working tree changes)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "src"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def cpu_description() -> str:
    """lscpu's model name and CPU count."""
    listing = subprocess.run(["lscpu"], check=True, capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in listing.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs"


def report(arms: dict[str, list[dict]], floors: list[tuple[float, float]], runs: int) -> str:
    """The markdown table: each figure's median per arm, and the floor."""
    import torch
    import transformers

    command = f"python benchmarks/startup.py {' '.join(sys.argv[1:])}".strip()
    heading = (f"`{command}`: median of {runs} runs, the arms in turn; wall-clock seconds (CPU seconds). CPU: "
               f"{cpu_description()}; python "
               f"{sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}.")
    lines = [heading, "", f"| | target | {' | '.join(arms)} |", f"|---|---|{'---|' * len(arms)}"]
    for what, target, key in ROWS:
        lines.append(f"| {what} | {target} | {' | '.join(median([run[key] for run in arms[arm]]) for arm in arms)} |")
    lines.append(f"| floor: `python -c \"{FLOOR}\"` | | {median(floors)}, either arm |" + " |" * (len(arms) - 1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each command per arm (default 5)")
    parser.add_argument("--before", default="d207dd0", help="the older commit (default d207dd0: before lazy imports)")
    args = parser.parse_args()
    script = shutil.which("kosmos-serve", path=str(Path(sys.executable).parent)) or shutil.which("kosmos-serve")
    if script is None:
        raise SystemExit("no kosmos-serve script: pip install -e .")
    dirty = " with changes" if git("status", "--porcelain", "src") else ""
    with tempfile.TemporaryDirectory(prefix="kosmos-startup-") as scratch:
        sources = {f"before ({git('rev-parse', '--short', args.before)})": extract_source(args.before, Path(scratch)),
                   f"after ({git('rev-parse', '--short', 'HEAD')}{dirty})": REPO / "src"}
        environments = {arm: arm_environment(source) for arm, source in sources.items()}
        arms: dict[str, list[dict]] = {arm: [] for arm in sources}
        floors = []
        for number in range(1, args.runs + 1):
            for arm, env in environments.items():
                arms[arm].append(measure(script, env))
                print(f"run {number} {arm}: " + ", ".join(f"{key} {median([figure])}"
                                                          for key, figure in arms[arm][-1].items()), file=sys.stderr)
            floors.append(timed([sys.executable, "-c", f"{FLOOR}\nimport sys, time\n{PRINT_STAMP}"], dict(os.environ))[1])
            print(f"run {number} floor: {median(floors[-1:])}", file=sys.stderr)
    print(report(arms, floors, args.runs))


if __name__ == "__main__":
    main()
