"""Benchmark: the noise schedules a flow model steps through, with mu computed from the canvas or from one tile.

For FLUX.1's scheduler config (dynamic shift: 0.5 at 256 tokens, 1.15 at 4096) and FLUX.2's empirical rule, 28
steps, canvases of 1024² to 8192² in 1024-px tiles: mu, how many steps keep sigma above 0.95 (the picture is
still almost pure noise) and above 0.5, and the sigma of the middle step. It is the real diffusers scheduler,
not a copy of its formula. Table plus JSON.

    python bench/flow_shift.py [--steps 28] [--json bench/results/flow_shift.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def schedule(rule: str, tokens: int, steps: int) -> tuple[float, list[float]]:
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from gigadiff.facts import ShiftRule
    from gigadiff.shift import rule_mu

    mu = rule_mu(ShiftRule("linear" if rule == "FLUX.1" else "empirical"), tokens, steps)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return float(mu), [float(s) for s in scheduler.sigmas[:-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--json", type=Path, default=Path("bench/results/flow_shift.json"))
    args = parser.parse_args()
    tile = 1024
    rows = []
    print(f"{'rule':<7} {'canvas':>7} {'mu from':>8} {'mu':>7} {'steps s>0.95':>13} {'steps s>0.5':>12} "
          f"{'middle sigma':>13}")  # fmt: skip
    for rule in ("FLUX.1", "FLUX.2"):
        for side in (1024, 2048, 4096, 8192):
            for source in ("canvas", "tile"):
                px = side if source == "canvas" else min(side, tile)
                mu, sigmas = schedule(rule, (px // 16) ** 2, args.steps)
                row = {"rule": rule, "canvas": side, "mu_from": source, "mu": mu, "sigmas": sigmas,
                       "steps_above_0.95": sum(s > 0.95 for s in sigmas),
                       "steps_above_0.5": sum(s > 0.5 for s in sigmas),
                       "middle_sigma": sigmas[len(sigmas) // 2]}  # fmt: skip
                rows.append(row)
                print(f"{rule:<7} {side:>6}² {source:>8} {mu:>7.2f} {row['steps_above_0.95']:>9}/{args.steps} "
                      f"{row['steps_above_0.5']:>8}/{args.steps} {row['middle_sigma']:>13.4f}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
