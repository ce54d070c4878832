"""RLlib's PPO on moderato's vector environment, with several env runners: the path beyond one
machine.

    pip install ./python "ray[rllib]" torch
    python python/examples/rllib_ppo.py --env-runners 2 --envs-per-runner 4 --iterations 5

Each env runner is a Ray actor that builds ``gym.make_vec("moderato/Host-v0", num_envs=E, ...)``,
i.e. one :class:`moderato.HostVectorEnv` stepping E simulators in Rust threads; the learner
collects ``env runners × E`` trajectories per rollout. What scales: env runners (Ray actors,
spread over every node of a cluster) × environments per runner (threads inside each actor).

On a cluster, start Ray there (``ray start --head`` on one node, ``ray start --address=<head>:6379``
on the others, each with ``pip install ./python``) and pass ``--address <head>:6379`` (or
``auto`` on a cluster node): the script then calls ``ray.init(address=...)`` instead of starting a
local Ray, and ``--env-runners`` can go up to the cluster's CPUs.

The trained policy is evaluated on the scenario's seeds 101-103 with ``HostEnv.summary`` next to
``dim`` and ``static:heavy`` from ``HostEnv.evaluate``; a JSON line with every figure closes the
output.
"""

import argparse
import json
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

import moderato

REPO = Path(__file__).resolve().parents[2]
# "module:id" makes gymnasium import moderato (which registers the id) inside every env runner.
ENV = "moderato:" + moderato.ENV_ID


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default=str(REPO / "experiments" / "scenarios" / "bulk-stream.toml"))
    p.add_argument("--config", default=str(REPO / "experiments" / "quickstart.toml"),
                   help="experiment config whose [sim] applies")
    p.add_argument("--env-runners", type=int, default=2)
    p.add_argument("--envs-per-runner", type=int, default=4)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--address", default=None, help="a Ray cluster's address; default: a local Ray")
    a = p.parse_args()

    import ray
    from ray.rllib.algorithms.ppo import PPOConfig

    ray.init(address=a.address, include_dashboard=False)
    env_config = {"scenario": a.scenario, "config": a.config}
    steps = moderato.HostEnv(a.scenario, config=a.config).episode_steps
    batch = a.env_runners * a.envs_per_runner * steps
    config = (
        PPOConfig()
        .environment(ENV, env_config=env_config)
        .env_runners(
            num_env_runners=a.env_runners,
            num_envs_per_env_runner=a.envs_per_runner,
            rollout_fragment_length=steps,
            # moderato.HostVectorEnv: one Rust-threaded vector env per runner.
            gym_env_vectorize_mode=gym.VectorizeMode.VECTOR_ENTRY_POINT,
        )
        .training(train_batch_size_per_learner=batch, minibatch_size=max(batch // 8, 32), gamma=0.9)
    )
    algo = config.build_algo()
    t0 = time.perf_counter()
    env_steps = 0
    for i in range(a.iterations):
        r = algo.train()
        env_steps = r["env_runners"]["num_env_steps_sampled_lifetime"]
        ret = r["env_runners"].get("episode_return_mean", float("nan"))
        print(f"iteration {i + 1}: {env_steps} env steps, episode return {ret:.3f}")
    wall = time.perf_counter() - t0

    module = algo.get_module()
    env = moderato.HostEnv(a.scenario, config=a.config)
    rows = []
    import torch

    for seed in (101, 102, 103):
        obs, _ = env.reset(seed=seed)
        truncated = False
        while not truncated:
            out = module.forward_inference({"obs": torch.from_numpy(obs[None, :])})
            logits = out["action_dist_inputs"][0].detach().numpy()
            action = np.clip(logits[: env.action_space.shape[0]], -1.0, 1.0)  # the Gaussian's mean
            obs, _, _, truncated, _ = env.step(action)
        rows.append(env.summary("rllib-ppo"))
    result = {
        "env_runners": a.env_runners,
        "envs_per_runner": a.envs_per_runner,
        "iterations": a.iterations,
        "env_steps": env_steps,
        "wall_s": wall,
        "steps_per_s": env_steps / wall,
        "rllib-ppo": {k: float(np.mean([r[k] for r in rows])) for k in ("cpu_us_per_packet", "slo_violation_rate")},
    }
    for name in ("dim", "static:heavy"):
        b = env.evaluate(name, seeds=[101, 102, 103])
        result[name] = {k: float(np.mean([r[k] for r in b])) for k in ("cpu_us_per_packet", "slo_violation_rate")}
    print(json.dumps(result))
    ray.shutdown()


if __name__ == "__main__":
    main()
