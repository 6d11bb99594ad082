"""What a run says about itself: plain log lines when its output goes to a file, the metrics in
metrics.jsonl, environment.json kept across starts, and a profile of chosen steps."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # training runs in subprocesses

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(
  r"^\d\d:\d\d:\d\d step (\d+)/(\d+)  loss [\d.]+  lr [\d.e+-]+  [\d,]+ ms/step  "
  r"[\d,]+ tok/s  MFU [\d.]+%  data wait [\d.]+%"
)


def train(workdir: Path, steps: int, *extra: str) -> str:
  """train.py with stdout and stderr going to files (not a terminal); returns stderr."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  with open(workdir.parent / "out.txt", "w") as out, open(workdir.parent / "err.txt", "w") as err:
    code = subprocess.call(
      [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        "smoke",
        "--workdir",
        str(workdir),
        f"--config.num_train_steps={steps}",
        "--config.decode.bleu_at_end=False",
        *extra,
      ],
      stdout=out,
      stderr=err,
      env=env,
      cwd=ROOT,
      timeout=600,
    )
  text = (workdir.parent / "err.txt").read_text()
  assert code == 0, text[-3000:]
  return text


def test_a_redirected_run_logs_plain_lines_and_records_its_environment_and_a_profile(tmp_path):
  workdir = tmp_path / "run"
  log = train(workdir, 6, "--config.log_every_steps=1", "--config.profile_steps=2,3")
  assert "\r" not in log
  steps = [int(m[1]) for m in (LINE.match(line) for line in log.splitlines()) if m]
  assert steps == [1, 2, 3, 4, 5, 6], log[-3000:]
  assert "model: translation" in log and "devices: " in log and "MFU against" in log

  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in records if "train/loss" in r]
  assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
  for key in (
    "train/step_time_s",
    "train/tokens_per_second",
    "train/mfu",
    "train/data_wait_fraction",
    "train/learning_rate",
  ):
    assert all(key in r for r in logged), key

  environment = json.loads((workdir / "environment.json").read_text())
  assert len(environment) == 1
  record = environment[0]
  assert record["versions"]["jax"] and record["process_count"] == 1
  assert record["device_count"] == 8 and record["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert "--workdir" in record["command"] and record["git_commit"]

  planes = list((workdir / "profile").rglob("*.xplane.pb"))  # TensorBoard's profile plugin
  assert planes and planes[0].stat().st_size > 0
  (perfetto,) = (workdir / "profile").rglob("perfetto_trace.json.gz")  # ui.perfetto.dev
  assert json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]

  train(workdir, 8)  # a resumed run adds its start to the history
  environment = json.loads((workdir / "environment.json").read_text())
  assert len(environment) == 2 and environment[0] == record
