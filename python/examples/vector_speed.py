"""Environment steps per second: HostVectorEnv (N simulators in Rust threads, GIL released)
against N HostEnvs stepped one after another from Python, in the same run.

    python python/examples/vector_speed.py [--scenario bulk-stream] [--envs 8] [--threads 0] [--steps 200]
"""

import argparse
import time
from pathlib import Path

import numpy as np

import moderato

REPO = Path(__file__).resolve().parents[2]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", default="bulk-stream")
    p.add_argument("--envs", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args()
    path = REPO / "experiments" / "scenarios" / f"{a.scenario}.toml"

    singles = [moderato.HostEnv(path) for _ in range(a.envs)]
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, size=(a.steps, a.envs, singles[0].action_space.shape[0])).astype(np.float32)
    for i, e in enumerate(singles):
        e.reset(seed=i)
    t0 = time.perf_counter()
    for k in range(a.steps):
        for i, e in enumerate(singles):
            if e.step(actions[k, i])[3]:
                e.reset()
    single_s = time.perf_counter() - t0

    vec = moderato.HostVectorEnv(path, num_envs=a.envs, threads=a.threads)
    vec.reset(seed=0)
    t0 = time.perf_counter()
    for k in range(a.steps):
        vec.step(actions[k])
    vec_s = time.perf_counter() - t0

    n = a.steps * a.envs
    print(f"{a.scenario}, {a.envs} envs, {a.steps} steps each: HostEnv loop {n / single_s:.0f} steps/s, "
          f"HostVectorEnv {n / vec_s:.0f} steps/s, ratio {single_s / vec_s:.2f}")


if __name__ == "__main__":
    main()
