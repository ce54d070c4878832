"""Bad input raises a Python exception that carries the Rust message; it never aborts."""

import numpy as np
import pytest

import moderato
from conftest import REPO, scenario


def test_missing_scenario_is_file_not_found_naming_the_path():
    with pytest.raises(FileNotFoundError, match="no-such-host.toml"):
        moderato.HostEnv("experiments/scenarios/no-such-host.toml")


def test_unknown_scenario_key_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    text = (REPO / "experiments" / "scenarios" / "bulk-tx.toml").read_text()
    bad.write_text(text.replace("[host]", "[host]\nnic_cpus = 3", 1) if "[host]" in text else "nic_cpus = 3\n" + text)
    with pytest.raises(ValueError, match=r"bad\.toml.*nic_cpus|nic_cpus.*bad\.toml"):
        moderato.HostEnv(bad)


def test_unknown_sim_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown field `episode_step`.*episode_steps"):
        moderato.HostEnv(scenario("bulk-tx"), sim={"episode_step": 5})


def test_out_of_range_sim_value_says_what_to_use():
    with pytest.raises(ValueError, match=r"episode_steps = 0"):
        moderato.HostEnv(scenario("bulk-tx"), sim={"episode_steps": 0})
    with pytest.raises(ValueError, match=r"slo_p99_us"):
        moderato.HostEnv(scenario("bulk-tx"), sim={"reward": {"slo_p99_us": -1.0}})


def test_missing_config_file_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="nowhere.toml"):
        moderato.HostEnv(scenario("bulk-tx"), config="nowhere.toml")


def test_action_of_the_wrong_shape_says_what_the_env_takes():
    env = moderato.HostEnv(scenario("mixed-host"))
    env.reset(seed=1)
    dim = env.action_space.shape[0]
    with pytest.raises(ValueError, match=rf"action has 3 values; this env takes {dim}.*nic.rx_usecs"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(2, "):
        env.step(np.zeros((2, dim)))
    bad = np.zeros(dim)
    bad[7] = np.nan
    with pytest.raises(ValueError, match=r"action\[7\] \(vm0.backend.rx_frames\) = NaN"):
        env.step(bad)
    # The env is still usable after a refused action.
    env.step(np.zeros(dim))


def test_vector_actions_of_the_wrong_shape():
    vec = moderato.HostVectorEnv(scenario("bulk-tx"), num_envs=2)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match=r"actions of shape \(3, "):
        vec.step(np.zeros((3, vec.single_action_space.shape[0])))


def test_unknown_policy_lists_the_baselines():
    env = moderato.HostEnv(scenario("bulk-tx"))
    with pytest.raises(ValueError, match=r"unknown policy `dimm`.*per-packet"):
        env.evaluate("dimm", seeds=[1])


def test_model_that_does_not_fit_says_why(tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "model.json").write_text("{}")
    env = moderato.HostEnv(scenario("bulk-tx"))
    with pytest.raises(ValueError, match="model.json"):
        env.evaluate(str(broken), seeds=[1])


def test_step_before_reset_and_reset_options():
    env = moderato.HostEnv(scenario("bulk-tx"))
    with pytest.raises(ValueError, match="reset"):
        env.step(np.zeros(env.action_space.shape))
    with pytest.raises(ValueError, match="options"):
        env.reset(seed=1, options={"scenario": "x"})
