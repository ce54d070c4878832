"""HostVectorEnv: N simulators in Rust threads behave exactly as N HostEnvs."""

import gymnasium as gym
import numpy as np

import moderato
from conftest import scenario


def test_vector_equals_singles_across_autoreset():
    n, steps, length = 3, 11, 4
    sim = {"episode_steps": length}
    vec = moderato.HostVectorEnv(scenario("onoff-bursts"), num_envs=n, sim=sim, threads=2)
    singles = [moderato.HostEnv(scenario("onoff-bursts"), sim=sim) for _ in range(n)]
    vec.action_space.seed(3)
    actions = [vec.action_space.sample() for _ in range(steps)]

    obs, info = vec.reset(seed=100)
    assert obs.shape == (n, vec.single_observation_space.shape[0])
    for i, env in enumerate(singles):
        o, inf = env.reset(seed=100 + i)
        assert np.array_equal(obs[i], o)
        assert info["cpu_us_per_packet"][i] == inf["cpu_us_per_packet"]

    done = [False] * n
    resets = 0
    for a in actions:
        obs, rew, term, trunc, info = vec.step(a)
        for i, env in enumerate(singles):
            if done[i]:
                # Next-step autoreset: this step was a reset, seeded from the env's generator.
                o, inf = env.reset()
                r, te, tr = 0.0, False, False
                resets += 1
            else:
                o, r, te, tr, inf = env.step(a[i])
            assert np.array_equal(obs[i], o), i
            assert rew[i] == np.float32(r) and term[i] == te and trunc[i] == tr
            assert info["cpu_us_per_packet"][i] == inf["cpu_us_per_packet"]
            assert np.array_equal(info["vm_p99_us"][i], inf["vm_p99_us"])
            done[i] = te or tr
    assert resets == 2 * n  # the loop crossed two episode boundaries
    assert info["_cpu_us_per_packet"].all()


def test_make_vec_uses_the_rust_vector_env():
    vec = gym.make_vec(moderato.ENV_ID, num_envs=2, scenario=scenario("bulk-tx"), sim={"episode_steps": 3})
    assert isinstance(vec.unwrapped, moderato.HostVectorEnv)
    obs, _ = vec.reset(seed=0)
    assert vec.observation_space.contains(obs)
    obs, rew, term, trunc, _ = vec.step(vec.action_space.sample())
    assert obs.shape[0] == 2 and rew.shape == (2,) and not term.any()


def test_vector_obs_are_inside_the_batched_space():
    vec = moderato.HostVectorEnv(scenario("near-livelock"), num_envs=2, sim={"episode_steps": 5})
    obs, _ = vec.reset(seed=[7, 8])
    vec.action_space.seed(1)
    for _ in range(6):
        assert vec.observation_space.contains(obs)
        obs, *_ = vec.step(vec.action_space.sample())
