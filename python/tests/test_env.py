"""HostEnv: the Gymnasium contract, spaces, determinism and truncation."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import moderato
from conftest import scenario

SHORT = {"episode_steps": 8}


def test_passes_gymnasiums_env_checker():
    env = moderato.HostEnv(scenario("mixed-host"), sim=SHORT)
    check_env(env, skip_render_check=True)


def test_registered_id_makes_the_env_with_its_kwargs():
    env = gym.make(moderato.ENV_ID, scenario=scenario("mixed-host"), sim=SHORT)
    assert isinstance(env.unwrapped, moderato.HostEnv)
    assert env.unwrapped.scenario_name == "mixed-host"
    obs, info = env.reset(seed=1)
    assert obs.shape == env.observation_space.shape
    check_env(env.unwrapped, skip_render_check=True)


def test_spaces_come_from_the_feature_and_knob_tables():
    env = moderato.HostEnv(scenario("mixed-host"))
    vms = env.vms
    assert vms >= 2
    names = env.feature_names
    assert len(names) == env.observation_space.shape[0] == len(set(names))
    assert names[0] == "nic.rx_kpps_ln"
    assert "vm0.backend.rx_kpps_ln" in names and f"vm{vms - 1}.guest.probe_p99_ln" in names
    assert all(env.feature_docs[n] for n in names)
    # Documented ranges: rates are ln(1 + x/1000) up to 11.6, knobs encoded in [-1, 1].
    i = names.index("nic.rx_kpps_ln")
    assert env.observation_space.low[i] == 0.0 and env.observation_space.high[i] == pytest.approx(11.6)
    j = names.index("vm0.frontend.rx_usecs")
    assert (env.observation_space.low[j], env.observation_space.high[j]) == (-1.0, 1.0)
    # Six values per layer: ethtool's four knobs, then the NAPI deferral.
    assert env.action_space.shape == (6 * (1 + 2 * vms),)
    assert env.action_names[:6] == (
        "nic.rx_usecs", "nic.rx_frames", "nic.tx_usecs", "nic.tx_frames", "nic.napi_defer", "nic.napi_timeout_us"
    )
    assert env.action_names[6] == "vm0.backend.rx_usecs"
    bounds = env.knob_bounds()
    low = env.decode_action(-np.ones(env.action_space.shape))
    high = env.decode_action(np.ones(env.action_space.shape))
    assert low["nic.rx_usecs"] == 0 and low["vm1.frontend.tx_frames"] == 1
    assert high["nic.rx_frames"] == bounds["nic"][1]
    assert high["vm0.backend.rx_usecs"] == bounds["backend"][0]
    assert low["nic.napi_defer"] == 0 and high["nic.napi_defer"] == 8 and high["vm0.frontend.napi_timeout_us"] == 500
    assert high["vm0.backend.napi_defer"] == 0, "a backend has no NAPI"


def rollout(env, seed, actions):
    obs, info = env.reset(seed=seed)
    trace = [obs]
    for a in actions:
        obs, r, term, trunc, info = env.step(a)
        trace.append((obs, r, term, trunc, info["cpu_us_per_packet"], info["p99_us"]))
    return trace


def same(x, y):
    for a, b in zip(x, y):
        if isinstance(a, tuple):
            assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
        else:
            assert np.array_equal(a, b)


def test_same_seed_same_trajectory_other_seed_differs():
    env = moderato.HostEnv(scenario("onoff-bursts"), sim=SHORT)
    env.action_space.seed(5)
    actions = [env.action_space.sample() for _ in range(8)]
    a = rollout(env, 11, actions)
    b = rollout(moderato.HostEnv(scenario("onoff-bursts"), sim=SHORT), 11, actions)
    same(a, b)
    c = rollout(env, 12, actions)
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a[1:], c[1:]))


def test_reset_without_seed_continues_the_seeded_sequence():
    def episodes(env):
        firsts = [env.reset(seed=3)[0]]
        firsts += [env.reset()[0] for _ in range(2)]
        return firsts

    a = episodes(moderato.HostEnv(scenario("rr-latency"), sim=SHORT))
    b = episodes(moderato.HostEnv(scenario("rr-latency"), sim=SHORT))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[1], a[2])


@pytest.mark.parametrize("name", ["mixed-host", "near-livelock", "bulk-stream", "diurnal-ramp"])
def test_every_observation_is_inside_the_observation_space(name):
    env = moderato.HostEnv(scenario(name), sim={"episode_steps": 12})
    env.action_space.seed(0)
    dim = env.action_space.shape[0]
    # Random actions, then the two ends of the knob range (per-packet and the heaviest setting).
    plans = [[env.action_space.sample() for _ in range(12)], [-np.ones(dim)] * 12, [np.ones(dim)] * 12]
    for seed, plan in enumerate(plans):
        obs, _ = env.reset(seed=seed)
        assert env.observation_space.contains(obs), (name, "reset")
        for k, a in enumerate(plan):
            obs, r, *_ = env.step(a)
            outside = [n for n, x, lo, hi in zip(env.feature_names, obs, env.observation_space.low,
                                                   env.observation_space.high) if not lo <= x <= hi]
            assert env.observation_space.contains(obs), (name, seed, k, outside)
            assert np.isfinite(r)


def test_truncated_exactly_at_the_episode_length_never_terminated():
    env = moderato.HostEnv(scenario("bulk-tx"), sim={"episode_steps": 7})
    env.reset(seed=1)
    flags = [env.step(env.action_space.sample())[2:4] for _ in range(7)]
    assert [t for _, t in flags] == [False] * 6 + [True]
    assert not any(term for term, _ in flags)
    # A new episode starts counting again.
    env.reset(seed=2)
    assert env.step(env.action_space.sample())[3] is False


def test_info_carries_ground_truth():
    env = moderato.HostEnv(scenario("mixed-host"), sim=SHORT)
    env.reset(seed=1)
    _, reward, _, _, info = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
    parts = sum(info[f"cpu_us_per_packet_{k}"] for k in ("nic", "backend", "frontend", "stack"))
    assert info["cpu_us_per_packet"] == pytest.approx(parts)
    assert info["cpu_us_per_packet"] > 0 and info["completed"] > 0 and info["throughput_pps"] > 0
    assert info["p99_us"] >= info["p50_us"] > 0
    assert info["vm_p99_us"].shape == (env.vms,)
    assert info["offered"] >= info["completed"] + info["dropped"] - info["in_flight"]
    assert reward == pytest.approx(info["reward_cpu"] + info["reward_latency"] + info["reward_drops"], abs=1e-5)
    assert isinstance(info["slo_violated"], bool)


def test_sim_settings_from_an_experiment_config_and_overrides(repo):
    env = moderato.HostEnv(scenario("bulk-stream"), config=repo / "experiments" / "quickstart.toml")
    assert env.episode_steps == 64
    env = moderato.HostEnv(scenario("bulk-stream"), config=repo / "experiments" / "quickstart.toml",
                           sim={"episode_steps": 5, "reward": {"slo_p99_us": 90.0}})
    assert env.episode_steps == 5 and env.sim_config()["reward"]["slo_p99_us"] == 90.0
