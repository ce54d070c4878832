"""Stable-Baselines3's PPO on the quickstart suite through moderato.HostEnv, side by side with
`moderato train` on the same suite, the same budget and the same machine, in one run.

    pip install ./python stable-baselines3 torch      # torch only for this benchmark
    python python/examples/sb3_ppo.py                 # the quickstart's 262144 steps
    python python/examples/sb3_ppo.py --timesteps 16384   # a small budget (32 iterations)
    MODERATO_BIN=target/release/moderato python python/examples/sb3_ppo.py   # a built binary

It prints, for both trainers, environment steps per second over the whole training (simulation,
rollouts and updates) and the trained policy's CPU per packet and SLO violations on the
quickstart's evaluation seeds, next to the same baselines, all measured by
`HostEnv.evaluate` / `HostEnv.summary` (moderato eval's columns). A JSON line with every figure
closes the output.

The suite is experiments/quickstart.toml's: bulk-stream and bulk-tx, [sim] from that file
(episodes of 64 × 10 ms). SB3 gets the same 8 environments (4 per scenario), rollouts of 64 steps,
8 minibatches and gamma 0.9; the rest is SB3's defaults.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import moderato

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "experiments" / "quickstart.toml"
SCENARIOS = [REPO / "experiments" / "scenarios" / f"{n}.toml" for n in ("bulk-stream", "bulk-tx")]
EVAL_SEEDS = [101, 102, 103]
BASELINES = ["per-packet", "static:mlx5", "static:heavy", "dim", "itr"]
# The quickstart's rollout: 8 envs × 64 steps per iteration, a checkpoint every 32 iterations.
NUM_ENVS, NUM_STEPS, CHECKPOINT_EVERY = 8, 64, 32


def mean(rows, key):
    return float(np.mean([r[key] for r in rows]))


def score(rows):
    return {"cpu_us_per_packet": mean(rows, "cpu_us_per_packet"),
            "slo_violation_rate": mean(rows, "slo_violation_rate"), "drop_rate": mean(rows, "drop_rate")}


def train_sb3(timesteps, seed):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    fns = [lambda sc=SCENARIOS[i % len(SCENARIOS)]: moderato.HostEnv(sc, config=CONFIG) for i in range(NUM_ENVS)]
    venv = DummyVecEnv(fns)
    venv.seed(seed)
    model = PPO("MlpPolicy", venv, n_steps=NUM_STEPS, batch_size=NUM_ENVS * NUM_STEPS // 8, gamma=0.9,
                seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(total_timesteps=timesteps)
    wall = time.perf_counter() - t0
    return model, wall


def evaluate_sb3(model):
    rows = {}
    for sc in SCENARIOS:
        env = moderato.HostEnv(sc, config=CONFIG)
        out = []
        for seed in EVAL_SEEDS:
            obs, _ = env.reset(seed=seed)
            truncated = False
            while not truncated:
                action, _ = model.predict(obs, deterministic=True)
                obs, _, _, truncated, _ = env.step(action)
            out.append(env.summary("sb3-ppo"))
        rows[env.scenario_name] = score(out)
    return rows


def train_moderato(timesteps):
    iterations = timesteps // (NUM_ENVS * NUM_STEPS)
    if iterations % CHECKPOINT_EVERY:
        sys.exit(f"--timesteps must be a multiple of {NUM_ENVS * NUM_STEPS * CHECKPOINT_EVERY} "
                 "(moderato train checkpoints every 32 iterations of 512 steps)")
    out = REPO / "runs" / f"sb3-side-by-side-{int(time.time())}"
    # The binary named by MODERATO_BIN, else `cargo run` (built before the clock starts).
    cargo = [os.environ["MODERATO_BIN"]] if os.environ.get("MODERATO_BIN") else \
        ["cargo", "run", "--quiet", "--release", "--bin", "moderato", "--"]
    subprocess.run(cargo + ["--help"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    subprocess.run(cargo + ["train", str(CONFIG), "--out", str(out), "--max-iterations", str(iterations),
                            "--no-eval"], cwd=REPO, check=True)
    wall = time.perf_counter() - t0
    model_dir = out / "model"
    if not model_dir.exists():
        last = sorted(glob.glob(str(out / "checkpoints" / "iter-*")))[-1]
        subprocess.run(cargo + ["export", last, str(model_dir)], cwd=REPO, check=True)
    return model_dir, wall


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timesteps", type=int, default=262144)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--skip-moderato", action="store_true", help="train with SB3 only")
    a = p.parse_args()

    result = {"timesteps": a.timesteps, "eval_seeds": EVAL_SEEDS, "baselines": {}}
    envs = {sc: moderato.HostEnv(sc, config=CONFIG) for sc in SCENARIOS}
    for name in BASELINES:
        result["baselines"][name] = {e.scenario_name: score(e.evaluate(name, seeds=EVAL_SEEDS)) for e in envs.values()}

    model, wall = train_sb3(a.timesteps, a.seed)
    result["sb3"] = {"wall_s": wall, "steps_per_s": a.timesteps / wall, "eval": evaluate_sb3(model)}
    if not a.skip_moderato:
        model_dir, wall = train_moderato(a.timesteps)
        evals = {e.scenario_name: score(e.evaluate(str(model_dir), seeds=EVAL_SEEDS)) for e in envs.values()}
        result["moderato"] = {"wall_s": wall, "steps_per_s": a.timesteps / wall, "eval": evals,
                              "model": str(model_dir)}
        result["steps_per_s_ratio_moderato_over_sb3"] = result["moderato"]["steps_per_s"] / result["sb3"]["steps_per_s"]

    print(f"{'policy':<14} {'scenario':<12} {'CPU µs/pkt':>10} {'SLO viol.':>9} {'drops':>7}")
    table = dict(result["baselines"])
    table["sb3-ppo"] = result["sb3"]["eval"]
    if "moderato" in result:
        table["moderato-ppo"] = result["moderato"]["eval"]
    for name, per in table.items():
        for sc, s in per.items():
            print(f"{name:<14} {sc:<12} {s['cpu_us_per_packet']:>10.3f} {s['slo_violation_rate']:>9.1%} "
                  f"{s['drop_rate']:>7.2%}")
    for who in ("sb3", "moderato"):
        if who in result:
            print(f"{who}: {result[who]['wall_s']:.1f} s wall, {result[who]['steps_per_s']:.0f} env steps/s")
    print(json.dumps(result))


if __name__ == "__main__":
    os.chdir(REPO)
    main()
