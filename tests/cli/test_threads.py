"""`--threads N`: translate and evaluate compute on N of the CPU cores the process may use."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_line_error
from transformer import evaluate as evaluate_command
from transformer import translate as translate_command
from transformer.cli import use_cores

ROOT = Path(__file__).resolve().parents[2]
needs_affinity = pytest.mark.skipif(
  not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's"
)


@needs_affinity
def test_xla_computes_on_that_many_threads_which_may_run_on_any_core():
  """In a fresh interpreter, as a command runs: XLA's pool has one thread (its threads are named
  tf_XLAEigen), and every thread may then run on any core the process may use, so that two
  commands with --threads 1 are not both held to the first core."""
  code = (
    "import os\n"
    "from transformer.cli import use_cores\n"
    "allowed = os.sched_getaffinity(0)\n"
    "use_cores(1)\n"
    "import jax\n"
    "jax.jit(lambda x: x @ x)(jax.numpy.ones((256, 256))).block_until_ready()\n"
    "tasks = os.listdir('/proc/self/task')\n"
    "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in tasks]\n"
    "print(names.count('tf_XLAEigen'))\n"
    "print(all(os.sched_getaffinity(int(t)) == allowed for t in tasks))\n"
  )
  env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, not the tests' eight
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  ).stdout
  assert out.split() == ["1", "True"]


@needs_affinity
def test_after_jax_started_it_only_warns(caplog):
  import jax

  jax.numpy.ones(3).block_until_ready()  # the backend is up, as in this test process
  before = os.sched_getaffinity(0)
  with caplog.at_level(logging.WARNING):
    use_cores(1)
  assert os.sched_getaffinity(0) == before
  assert "--threads 1 has no effect: JAX has already started" in caplog.text


@needs_affinity
@pytest.mark.parametrize(
  "command, text",
  [(translate_command, ["a dog"]), (evaluate_command, [])],
  ids=["translate", "evaluate"],
)
def test_more_threads_than_cores_is_one_line(command, text, capsys, tmp_path):
  cores = len(os.sched_getaffinity(0))
  argv = ["--workdir", str(tmp_path), "--threads", str(cores + 1), *text]
  line = one_line_error(capsys, lambda: command.main(argv))
  assert line == (
    f"error: --threads {cores + 1} is more than the {cores} CPU core(s) this process may use"
  )


def test_none_leaves_the_process_as_it_is():
  before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
  use_cores(None)
  assert (os.sched_getaffinity(0) if before is not None else None) == before
