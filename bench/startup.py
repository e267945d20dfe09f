"""Benchmark: how fast the command line answers before any model loads.

Fresh processes, each timed from start to exit, as a new user meets them: an empty Hugging Face cache and no
network (HF_HOME is an empty folder, HF_HUB_OFFLINE is unset and the hub endpoint refuses connections).
`gigadiff --version`, `python -c "import torch"`, `gigadiff generate x --size 100x100` (a size error, refused
from the model's description before torch is imported and before any network access) for the default preset and
for a local FLUX-shaped folder, and a valid request for that uncached preset (refused because the hub cannot be
reached). Best of N runs per row (process start-up wanders with the machine's load). Table plus JSON.

    python bench/startup.py [--runs 3] [--json bench/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tiny models: tests/helpers/tiny.py


def timed(command: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return time.perf_counter() - start, proc.returncode, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("bench/results/startup.json"))
    args = parser.parse_args()
    from tests.helpers.fake_hub import refusing_endpoint
    from tests.helpers.tiny import save_tiny, tiny_flux_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_HOME=f"{tmp}/hf-home", HF_ENDPOINT=refusing_endpoint())

        flux = save_tiny(tiny_flux_pipeline(), Path(tmp) / "tiny-flux")
        gigadiff = [sys.executable, "-m", "gigadiff"]
        rows = {
            "gigadiff --version": [*gigadiff, "--version"],
            'python -c "import torch"': [sys.executable, "-c", "import torch"],
            "bad size, preset sd15": [*gigadiff, "generate", "x", "--size", "100x100", "-o", f"{tmp}/o.png"],
            "uncached preset, no network": [*gigadiff, "generate", "x", "-o", f"{tmp}/o.png"],
            "bad size, FLUX folder": [
                *gigadiff,
                "generate",
                "x",
                "--model",
                str(flux),
                "--size",
                "1000x1000",
                "-o",
                f"{tmp}/o.png",
            ],
        }
        results = {}
        for name, command in rows.items():
            times, code, last = [], 0, ""
            for _ in range(args.runs):
                elapsed, code, last = timed(command, env)
                times.append(elapsed)
            results[name] = {"best_s": min(times), "runs_s": times, "exit_code": code, "last_line": last}
    torch_s = results['python -c "import torch"']["best_s"]
    print(f"{'command':<28} {'best s':>7} {'x torch import':>15} {'exit':>5}  output")
    for name, r in results.items():
        ratio = r["best_s"] / torch_s
        print(f"{name:<28} {r['best_s']:>7.3f} {ratio:>15.2f} {r['exit_code']:>5}  {r['last_line'][:70]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
