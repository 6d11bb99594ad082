"""What several test files check the same way."""

import jax.numpy as jnp

from transformer.cli import run_cli
from transformer.runs.checkpoint import Checkpointer, Record

TINY_MAX_LEN = 16  # positions of the tiny runs of tests/cli/conftest.py


def one_line_error(capsys, main, *, quiet_stdout: bool = False) -> str:
  """Runs `main` as the commands do and returns its error line: exit 2 and a single `error:`
  line on stderr (argparse's own errors exit from inside `main`); with `quiet_stdout`, nothing
  on stdout either."""
  try:
    code = run_cli(main)
  except SystemExit as exit:
    code = exit.code
  out, err = capsys.readouterr()
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines)
  if quiet_stdout:
    assert out == "", out
  return lines[0]


def save_steps(directory, steps) -> None:
  """Checkpoints of a one-array state at `steps` in `directory` (w = the step, 4 times)."""
  checkpointer = Checkpointer(directory, asynchronous=False)
  try:
    for step in steps:
      record = Record({"epoch": 0, "chunk": 0, "batch": step})
      checkpointer.save(step, {"w": jnp.full(4, float(step))}, record)
  finally:
    checkpointer.close()
