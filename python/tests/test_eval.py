"""Baselines and frozen models from Python give `moderato eval`'s numbers.

The reference is the `moderato` binary itself: `moderato eval` on an eval config written here, run
through `cargo run` (which builds it if needed, from the same workspace the package was built
from) or the binary named by `MODERATO_BIN`.
"""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import moderato
from conftest import REPO, scenario

SCENARIO = "mixed-host"
POLICIES = ["per-packet", "static:moderate", "dim", "itr", str(REPO / "models" / "default")]
SEEDS = [1, 2, 3]
STEPS = 25
COLUMNS = ["cpu_us_per_packet", "nic_cpu_us_per_packet", "p50_us", "p99_us", "slo_violation_rate",
           "drop_rate", "throughput_pps", "reward"]


def moderato_eval(tmp_path):
    cfg = tmp_path / "parity.toml"
    quoted = ", ".join(json.dumps(p) for p in POLICIES)
    cfg.write_text(
        'name = "parity"\n'
        f"scenarios = [{json.dumps(scenario(SCENARIO))}]\n"
        f"policies = [{quoted}]\n"
        f"seeds = {SEEDS}\n"
        f"[sim]\nepisode_steps = {STEPS}\n"
    )
    out = tmp_path / "out"
    binary = os.environ.get("MODERATO_BIN")
    if binary:
        cmd = [binary]
    else:
        cargo = shutil.which("cargo")
        assert cargo, "the eval parity test needs cargo (or MODERATO_BIN=path/to/moderato)"
        cmd = [cargo, "run", "--quiet", "--release", "--bin", "moderato", "--"]
    subprocess.run(cmd + ["eval", str(cfg), "--out", str(out), "--no-cache"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["rows"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return moderato_eval(tmp_path_factory.mktemp("eval"))


def label(policy, row):
    # Reports name a baseline by its name and a model by its directory path (the path as the
    # report writes it); Python's row must carry the same label.
    if policy.endswith("models/default"):
        assert row["policy"].endswith("models/default"), row["policy"]
        return row["policy"]
    return policy


@pytest.mark.parametrize("policy", POLICIES)
def test_evaluate_equals_moderato_eval(reference, policy):
    env = moderato.HostEnv(scenario(SCENARIO), sim={"episode_steps": STEPS})
    rows = env.evaluate(policy, seeds=SEEDS)
    assert [r["seed"] for r in rows] == SEEDS
    for row in rows:
        ref = next(r for r in reference if r["policy"] == label(policy, row) and r["seed"] == row["seed"])
        assert row["policy"] == ref["policy"] and row["scenario"] == ref["scenario"] == SCENARIO
        for c in COLUMNS:
            assert row[c] == ref[c], (policy, row["seed"], c)


def test_stepping_per_packet_from_python_equals_moderato_eval(reference):
    # An action of −1 everywhere decodes to per-packet (0 µs, 1 frame) on every layer.
    env = moderato.HostEnv(scenario(SCENARIO), sim={"episode_steps": STEPS})
    for seed in SEEDS:
        env.reset(seed=seed)
        truncated = False
        while not truncated:
            _, _, _, truncated, _ = env.step(-np.ones(env.action_space.shape, dtype=np.float32))
        mine = env.summary("per-packet")
        ref = next(r for r in reference if r["policy"] == "per-packet" and r["seed"] == seed)
        for c in COLUMNS:
            assert mine[c] == pytest.approx(ref[c], rel=1e-6, abs=1e-9), (seed, c)


def test_baselines_rank_as_expected_on_the_same_episodes():
    # On a request-response host per-packet has the lowest latency and heavy coalescing the
    # lowest CPU per packet (agent/tests/eval.rs pins the same ordering in Rust).
    env = moderato.HostEnv(scenario("rr-latency"), sim={"episode_steps": 20})
    pp = env.evaluate("per-packet", seeds=[1])[0]
    heavy = env.evaluate("static:heavy", seeds=[1])[0]
    assert heavy["cpu_us_per_packet"] < pp["cpu_us_per_packet"]
    assert heavy["p99_us"] > pp["p99_us"]
    assert "dim" in moderato.baseline_names() and "static:mlx5" in moderato.baseline_names()


def test_a_configs_controller_gains_reach_evaluate(tmp_path):
    # The [slo_feedback] table of the config a HostEnv is made from sets slo-feedback's gains, as
    # it does for `moderato eval`: a lower setpoint holds the p99 lower.
    cfg = tmp_path / "gains.toml"
    cfg.write_text("[sim]\nepisode_steps = 30\n[slo_feedback]\nsetpoint = 0.4\nheadroom = 0.3\n")
    tight = moderato.HostEnv(scenario("rr-latency"), config=cfg).evaluate("slo-feedback:200", seeds=[1])[0]
    default = moderato.HostEnv(scenario("rr-latency"), sim={"episode_steps": 30}).evaluate(
        "slo-feedback:200", seeds=[1])[0]
    assert tight["p99_us"] < 0.8 * default["p99_us"]
    cfg.write_text("[slo_feedback]\nsetpoint = 2.0\n")
    with pytest.raises(ValueError, match=r"\[slo_feedback\] setpoint = 2"):
        moderato.HostEnv(scenario("rr-latency"), config=cfg)
