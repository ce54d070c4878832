"""moderato's host simulator as a Gymnasium environment.

A thin layer over the Rust crates (``moderato._native``): the simulation, the feature and knob
tables, the baselines, frozen models and evaluation all run in Rust, with the GIL released while
they do; this module only builds Gymnasium spaces from those tables and converts types.

- :class:`HostEnv`: one simulated host, registered as ``"moderato/Host-v0"``::

      import gymnasium as gym, moderato
      env = gym.make("moderato/Host-v0", scenario="experiments/scenarios/mixed-host.toml")

- :class:`HostVectorEnv`: N hosts stepped in Rust threads (``gymnasium.vector.VectorEnv``; also
  ``gym.make_vec("moderato/Host-v0", num_envs=8, scenario=...)``).
- :meth:`HostEnv.evaluate`: a baseline (``per-packet``, ``static:<preset>``, ``dim``, ``itr``,
  ``best-static``) or a frozen-model directory on the env's scenario and settings, with
  ``moderato eval``'s episode loop and columns.

Errors from Rust arrive as ``FileNotFoundError`` (a path that does not exist), ``ValueError``
(an unknown key, a value out of range, an action of the wrong shape) or ``RuntimeError``, each
with the Rust message.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence, Union

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from . import _native

__all__ = ["HostEnv", "HostVectorEnv", "baseline_names", "ENV_ID", "__version__"]

__version__ = _native.__version__

#: The id under which :class:`HostEnv` is registered with Gymnasium.
ENV_ID = "moderato/Host-v0"

PathLike = Union[str, "os.PathLike[str]"]

# Seeds of episodes after the first (``reset()`` without a seed) are drawn from the env's
# ``np_random`` in [0, 2**63), so that one seed fixes a whole sequence of episodes.
_SEED_BOUND = 2**63


def baseline_names() -> list:
    """Every baseline name ``evaluate`` accepts (a frozen-model directory works too)."""
    return list(_native.baseline_names())


def _native_args(scenario: PathLike, config: Optional[PathLike], sim: Optional[dict]):
    if sim is not None and not isinstance(sim, dict):
        raise TypeError(f"sim must be a dict of [sim] keys (see experiments/example.toml), not {type(sim).__name__}")
    return (
        os.fspath(scenario),
        None if config is None else os.fspath(config),
        None if sim is None else json.dumps(sim),
    )


def _spaces(native) -> tuple:
    table = native.observation_table()
    names = tuple(row[0] for row in table)
    docs = {row[0]: row[3] for row in table}
    low = np.array([row[1] for row in table], dtype=np.float32)
    high = np.array([row[2] for row in table], dtype=np.float32)
    actions = tuple(native.action_names())
    obs_space = spaces.Box(low, high, dtype=np.float32)
    act_space = spaces.Box(-1.0, 1.0, shape=(len(actions),), dtype=np.float32)
    return obs_space, act_space, names, docs, actions


def _no_options(options: Optional[dict]) -> None:
    if options:
        raise ValueError(f"reset(options={options!r}): moderato's envs take no reset options")


class HostEnv(gym.Env):
    """One simulated virtualized host (moderato's discrete-event simulator).

    Args:
        scenario: a scenario TOML file (``experiments/scenarios/*.toml``; keys in
            ``experiments/scenarios/README.md``).
        config: optional experiment or evaluation config whose ``[sim]`` (interval, episode
            length, probes, noise, reward and SLO), ``[adaptive]`` and ``[static.<name>]`` tables
            apply.
        sim: optional dict of ``[sim]`` keys applied over the config's, e.g.
            ``{"episode_steps": 64, "reward": {"slo_p99_us": 100}}`` (``experiments/example.toml``
            documents them).

    Observation: a ``float32`` vector, the host's features, then each VM's backend features, then
    each guest's; names in :attr:`feature_names`, documentation in :attr:`feature_docs`; the
    ``Box`` bounds are the documented ranges of the features.

    Action: ``float32`` values in ``[-1, 1]``, four per layer (``rx_usecs, rx_frames, tx_usecs,
    tx_frames``) for the NIC, then each VM's backend and frontend (names in
    :attr:`action_names`); on a log scale, −1 is per-packet (0 µs, 1 frame) and 1 the bound of
    :meth:`knob_bounds`. :meth:`decode_action` shows the knobs an action sets.

    Reward: moderato's reward, ``−w_cpu·cpu/ref − w_lat·max(0, max_v p99_v/(margin·slo_v) − 1) − w_viol·[max_v p99_v > margin·slo_v] − w_drop·drops``,
    each VM judged against its own p99 target (``[[vm]] slo_p99_us`` of the scenario, else the
    config's ``slo_p99_us`` for a latency-sensitive VM); the targets are in the observation
    (``backend.slo_*``, ``guest.slo_*``, ``host.slo_*``).
    ``terminated`` is always False; ``truncated`` is True after ``episode_steps`` steps.

    Info (ground truth of the interval): ``cpu_us_per_packet`` and its split
    ``cpu_us_per_packet_{nic,backend,frontend,stack}``; ``p50_us`` and ``p99_us`` of the worst
    latency-sensitive VM (of all VMs when none is; 0 without samples) and ``slo_violated`` (some
    VM over its own target);
    ``offered``, ``completed``, ``dropped``, ``in_flight``, ``drop_fraction``, ``throughput_pps``,
    ``throughput_bps``; per VM ``vm_p50_us``, ``vm_p99_us``, ``vm_latency_samples``,
    ``vm_completed``, ``vm_dropped``; the reward's terms ``reward_cpu``, ``reward_latency``,
    ``reward_drops``; ``time_ns``.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        scenario: PathLike,
        config: Optional[PathLike] = None,
        sim: Optional[dict] = None,
        render_mode: Optional[str] = None,
    ):
        if render_mode is not None:
            raise ValueError(f"render_mode={render_mode!r}: HostEnv does not render")
        self._sim = _native.Sim(*_native_args(scenario, config, sim))
        (self.observation_space, self.action_space, self.feature_names, self.feature_docs,
         self.action_names) = _spaces(self._sim)
        self.render_mode = None

    @property
    def scenario_name(self) -> str:
        return self._sim.scenario_name

    @property
    def vms(self) -> int:
        return self._sim.vms

    @property
    def episode_steps(self) -> int:
        return self._sim.episode_steps

    def sim_config(self) -> dict:
        """The ``[sim]`` settings in force."""
        return self._sim.sim_config()

    def knob_bounds(self) -> dict:
        """``{layer kind: (usecs_max, frames_max)}``: what an action of 1.0 sets."""
        return self._sim.knob_bounds()

    def decode_action(self, action) -> dict:
        """The knobs ``action`` sets, ``{"nic.rx_usecs": 0, ...}``."""
        return self._sim.decode_action(np.ascontiguousarray(action, dtype=np.float32))

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        _no_options(options)
        sim_seed = seed if seed is not None else int(self.np_random.integers(0, _SEED_BOUND))
        return self._sim.reset(sim_seed)

    def step(self, action):
        return self._sim.step(np.ascontiguousarray(action, dtype=np.float32))

    def summary(self, policy: str = "python") -> dict:
        """The episode so far in ``moderato eval``'s columns (``cpu_us_per_packet``,
        ``slo_violation_rate``, ``p99_us``, ``drop_rate``, ...), labelled ``policy``."""
        return self._sim.summary(policy)

    def evaluate(self, policy: PathLike, seeds: Sequence[int] = (1, 2, 3), threads: int = 0) -> list:
        """One episode of ``policy`` per seed on this env's scenario and settings, run in Rust
        (``threads`` workers, 0: one per core) exactly as ``moderato eval`` runs it.

        ``policy`` is a baseline name (:func:`baseline_names`) or a frozen-model directory
        (``models/default``). Returns one dict per seed with ``moderato eval``'s columns.
        """
        return self._sim.evaluate(os.fspath(policy), [int(s) for s in seeds], threads)


class HostVectorEnv(VectorEnv):
    """``num_envs`` :class:`HostEnv` s with the same scenario and settings, stepped together in
    Rust threads with the GIL released (``threads``, 0: one per core).

    Env ``i`` behaves exactly as a :class:`HostEnv` reset with ``seed + i``: the same seeds give
    the same trajectories. Episodes autoreset on the next step (Gymnasium's default
    ``AutoresetMode.NEXT_STEP``), with seeds drawn from each env's generator as
    :meth:`HostEnv.reset` without a seed draws them.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        scenario: PathLike,
        num_envs: int = 1,
        config: Optional[PathLike] = None,
        sim: Optional[dict] = None,
        threads: int = 0,
        render_mode: Optional[str] = None,
    ):
        if render_mode is not None:
            raise ValueError(f"render_mode={render_mode!r}: HostVectorEnv does not render")
        args = _native_args(scenario, config, sim)
        self._vec = _native.VecSim(args[0], int(num_envs), args[1], args[2], threads)
        single = _native.Sim(*args)
        (self.single_observation_space, self.single_action_space, self.feature_names,
         self.feature_docs, self.action_names) = _spaces(single)
        self.num_envs = int(num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._rngs: Optional[list] = None
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        self.render_mode = None

    def reset(self, *, seed: Union[int, Sequence[int], None] = None, options: Optional[dict] = None):
        super().reset(seed=seed if isinstance(seed, (int, np.integer)) else None)
        _no_options(options)
        if seed is None:
            if self._rngs is None:
                self._rngs = [seeding.np_random()[0] for _ in range(self.num_envs)]
            seeds = [int(r.integers(0, _SEED_BOUND)) for r in self._rngs]
        else:
            seeds = [int(seed) + i for i in range(self.num_envs)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
            if len(seeds) != self.num_envs:
                raise ValueError(f"{len(seeds)} seeds for {self.num_envs} envs: give one seed per env or one int")
            self._rngs = [seeding.np_random(s)[0] for s in seeds]
        obs, _, _, _, info = self._vec.reset(seeds)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        return obs, info

    def step(self, actions):
        if self._rngs is None:
            raise ValueError("step before reset: call reset() first")
        mask = self._autoreset
        seeds = [int(r.integers(0, _SEED_BOUND)) if m else 0 for r, m in zip(self._rngs, mask)]
        obs, rewards, terminated, truncated, info = self._vec.step(
            np.ascontiguousarray(actions, dtype=np.float32), mask.tolist(), seeds
        )
        self._autoreset = terminated | truncated
        return obs, rewards, terminated, truncated, info

    def summary(self, i: int, policy: str = "python") -> dict:
        """Env ``i``'s episode so far, as :meth:`HostEnv.summary`."""
        return self._vec.summary(int(i), policy)


gym.register(id=ENV_ID, entry_point="moderato:HostEnv", vector_entry_point="moderato:HostVectorEnv")
