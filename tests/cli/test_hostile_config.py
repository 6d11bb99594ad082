"""Config values and command lines a tester found accepted, or refused late: each is refused
when the config is built (or the flags are parsed), in one line naming the key and the fix.

Fast: the configs are built, nothing trains; the command-line cases run train.py, which stops
before JAX is imported.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.config import Config
from transformer.configs import smoke
from transformer.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def smoke_with(**changes) -> Config:
  """The smoke recipe with `changes` ({"parallel.num_processes": 2}), built and checked."""
  values = smoke.get_config().to_dict()
  for key, value in changes.items():
    *blocks, name = key.split(".")
    block = values
    for part in blocks:
      block = block[part]
    block[name] = value
  return Config.from_dict(values)


def refused(**changes) -> str:
  with pytest.raises(UserError) as error:
    smoke_with(**changes)
  message = str(error.value)
  assert "\n" not in message
  return message


def train(workdir: Path, *args: str) -> tuple[int, list[str]]:
  """train.py with `args` after `--config smoke --workdir WORKDIR`: (exit status, stderr
  lines)."""
  result = subprocess.run(
    [sys.executable, "train.py", "--config", "smoke", "--workdir", str(workdir), *args],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    timeout=120,
  )
  return result.returncode, result.stderr.decode().strip().splitlines()


# ------------------------------------------------------------------------------------------------
# parallel: several processes need a coordinator, at host:port
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "changes",
  [
    {"parallel.num_processes": 2, "parallel.process_id": 0},
    {"parallel.num_processes": 2},
    {"parallel.process_id": 1},
  ],
)
def test_several_processes_without_a_coordinator(changes):
  """They trained one process alone, silently: without a coordinator the values are unused."""
  message = refused(**changes)
  assert "need parallel.coordinator_address" in message and "SLURM" in message


def test_one_process_or_a_cluster_environment_needs_no_coordinator():
  """The defaults (JAX reads a cluster's job from its environment) and one process pass."""
  assert smoke_with().parallel.num_processes == 0
  assert smoke_with(**{"parallel.num_processes": 1, "parallel.process_id": 0})


@pytest.mark.parametrize(
  "address, problem",
  [
    ("notahost", "is not host:port"),  # an IndexError inside JAX
    (":1234", "is not host:port"),
    ("::1:1234", "is not host:port"),  # IPv6 needs its brackets
    ("my host:1234", "is not host:port"),
    ("localhost:99999", "use a port in 1-65535"),  # waited for a coordinator forever
    ("localhost:0", "use a port in 1-65535"),
    ("localhost:", "use a port in 1-65535"),
    ("localhost:http", "use a port in 1-65535"),
  ],
)
def test_a_coordinator_address_that_is_not_host_port(address, problem):
  message = refused(
    **{
      "parallel.coordinator_address": address,
      "parallel.num_processes": 2,
      "parallel.process_id": 0,
    }
  )
  assert f"parallel.coordinator_address={address!r}" in message and problem in message


@pytest.mark.parametrize("address", ["10.0.0.1:1234", "node-0.cluster:65535", "[::1]:1234"])
def test_coordinator_addresses_that_pass(address):
  changes = {"parallel.num_processes": 2, "parallel.process_id": 1}
  config = smoke_with(**{"parallel.coordinator_address": address, **changes})
  assert config.parallel.coordinator_address == address


# ------------------------------------------------------------------------------------------------
# profile_steps within the run
# ------------------------------------------------------------------------------------------------


def test_profile_steps_after_the_last_step():
  """A trace of steps 100-200 of a 6-step run was skipped silently."""
  message = refused(profile_steps=(100, 200))
  assert "profile_steps=100,200 ends after num_train_steps=6" in message
  assert smoke_with(profile_steps=(5, 6)).profile_steps == (5, 6)


# ------------------------------------------------------------------------------------------------
# allow_config_change: keys of the schema, separated by commas
# ------------------------------------------------------------------------------------------------


def test_allow_config_change_splits_at_commas():
  """The command line gives "a,b" as one string, which matched no key."""
  config = smoke_with(allow_config_change=("data.vocab_size,model.vocab_size",))
  assert config.allow_config_change == ("data.vocab_size", "model.vocab_size")
  assert smoke_with(allow_config_change=("all",)).allow_config_change == ("all",)
  assert smoke_with(allow_config_change=("data", "model.d_ff")).allow_config_change == (
    "data",
    "model.d_ff",
  )


@pytest.mark.parametrize("given", [("model.bogus",), ("model.d_ff,model.d_fff",), ("alll",)])
def test_allow_config_change_refuses_keys_that_are_no_config_keys(given):
  message = refused(allow_config_change=given)
  assert "which is no config key" in message


def test_allow_config_change_from_the_command_line(monkeypatch):
  """As the command line reads it (config_flags finds the overrides in sys.argv)."""
  from transformer.train.__main__ import _CONFIG, parse_flags

  argv = [
    "train.py",
    "--config",
    "smoke",
    "--config.allow_config_change=data.vocab_size,model.vocab_size",
  ]
  monkeypatch.setattr(sys, "argv", argv)
  parse_flags(argv)
  config = Config.from_dict(_CONFIG.value.to_dict())
  assert config.allow_config_change == ("data.vocab_size", "model.vocab_size")


# ------------------------------------------------------------------------------------------------
# data: finite fractions, and a dataset the task reads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [math.nan, math.inf, -0.1, 1.0])
def test_validation_fraction_out_of_range_whatever_the_dataset(fraction):
  """NaN passed with Multi30k (the files' check only ran for datasets text and parallel) and
  was written to config.json."""
  message = refused(**{"data.validation_fraction": fraction})
  assert "data.validation_fraction must be a finite number in [0, 1)" in message


def test_running_text_is_refused_for_translation():
  """Refused only after the tokenizer and caches were built, saying to check the files."""
  message = refused(**{"data.dataset": "text", "data.train_files": ("input.txt",)})
  assert "data.dataset=text" in message and "task=lm" in message
  assert "data.dataset=parallel" in message
  lm = smoke_with(task="lm", **{"data.dataset": "text", "data.train_files": ("input.txt",)})
  assert lm.data.dataset == "text"


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "args, message",
  [
    # The last --config won, silently.
    (["--config", "default"], "--config is given 2 times (smoke, default)"),
    (["--config=default"], "--config is given 2 times (smoke, default)"),
    # absl's usage text, exit 1.
    (["extra_arg"], "unexpected arguments extra_arg"),
  ],
)
def test_train_command_line(args, message, tmp_path):
  code, lines = train(tmp_path, *args)
  assert code == 2 and len(lines) == 1, lines[-8:]
  assert lines[0].startswith("error: ") and message in lines[0], lines


def test_a_bad_key_to_allow_is_one_line_from_train(tmp_path):
  """Accepted, and the run trained, with a key that allowed nothing."""
  code, lines = train(tmp_path, "--config.allow_config_change=data.vocab_size,model.bogus")
  assert code == 2 and len(lines) == 1, lines[-8:]
  assert "allow_config_change names 'model.bogus', which is no config key" in lines[0]
