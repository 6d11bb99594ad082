"""The project's GPT against nanoGPT on nanoGPT's own CPU benchmark (character-level Tiny
Shakespeare), on the same characters, in paired rounds.

Each round runs nanoGPT's README command for a CPU (train.py config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=N --lr_decay_iters=N --dropout=0.0) and then
`python train.py --config shakespeare_char` on the same text, each pinned to one core (taskset;
torch with one thread, XLA's pool then sizes itself to the one core it sees), so a machine shared
with other work changes neither's CPU time much. Measured for each command:

  cpu_ms_per_step   process CPU seconds (user + system, all threads) per step, sampled twice a
                    second against the step its log shows, from step `--from_step` to the end,
                    leaving out the intervals that hold an evaluation (every 250 steps)
  wall_ms_per_step  the same intervals in wall-clock time (a busy machine inflates it)
  whole_cpu_s       CPU seconds of the whole command (imports, data, compilation, evaluations,
                    checkpoints, export), and whole_wall_s
  val_nll           mean NLL per character (nats) on the same validation characters, scored by
                    this file for both: targets v[1 + 64 k : 1 + 64 (k + 1)] of the held-out 10%
                    v, each window read with the 64 characters before its targets (both models
                    read the previous character at every position)

nanoGPT's data are made as its data/shakespeare_char/prepare.py makes them (sorted characters,
the first 90% of the text to train, uint16 ids), in a work folder with a copy of its source;
nanoGPT's fixed seed 1337 is shifted by the round's seed. The project's cache (token cache,
compiled programs, matmul peak) is shared by the rounds, as a user's second run shares it: round
1 is a first run, later rounds are not (both are reported).

  python -m benchmarks.lm_vs_nanogpt --nanogpt NANOGPT_DIR --torch_python VENV/bin/python \\
    --text input.txt [--preset full|quick] [--rounds 2] [--core 1]

`--preset quick` trains 30 steps (no validation score), and runs the project alone when nanoGPT's
source or a Python with torch is not given or not found. Results: benchmarks/results/
lm_vs_nanogpt_<device>.json and .png.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 64
EVAL_EVERY = 250
VAL_FRACTION = 0.1
STEP_PATTERN = re.compile(rb"(?:iter (\d+):|step (\d+)/\d+ )")

NANOGPT_ARGS = [
  "--device=cpu",
  "--compile=False",
  "--eval_iters=20",
  "--log_interval=1",
  "--block_size=64",
  "--batch_size=12",
  "--n_layer=4",
  "--n_head=4",
  "--n_embd=128",
  "--dropout=0.0",
  "--always_save_checkpoint=True",
]

# Run by the torch Python in the work folder: nanoGPT's train.py with its seed shifted.
NANOGPT_SEED = """import os, runpy, sys, torch
shift = int(os.environ["SEED_SHIFT"]); original = torch.manual_seed
torch.manual_seed = lambda seed: original(seed + shift)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


# ------------------------------------------------------------------------------------------------
# The same validation characters for both
# ------------------------------------------------------------------------------------------------


def split_text(text: str) -> tuple[str, str]:
  """nanoGPT's 90/10 split of the characters (prepare.py), which the recipe's
  data.validation_fraction=0.1 reproduces."""
  cut = int(len(text) * (1 - VAL_FRACTION))
  return text[:cut], text[cut:]


def windows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) [n, 64]: targets ids[1 + 64 k : 1 + 64 (k + 1)], inputs one id before."""
  n = (len(ids) - 1) // CONTEXT
  return ids[: n * CONTEXT].reshape(n, CONTEXT), ids[1 : 1 + n * CONTEXT].reshape(n, CONTEXT)


def nanogpt_nll(checkpoint: str, val_bin: str, source: str) -> dict:
  """Mean NLL per character of a nanoGPT checkpoint (run by the torch Python)."""
  import contextlib

  import torch
  import torch.nn.functional as F

  sys.path.insert(0, source)
  from model import GPT, GPTConfig

  saved = torch.load(checkpoint, map_location="cpu")
  with contextlib.redirect_stdout(sys.stderr):  # GPT() prints its parameter count
    model = GPT(GPTConfig(**saved["model_args"]))
  model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
  model.eval()
  inputs, targets = windows(np.fromfile(val_bin, dtype=np.uint16).astype(np.int64))
  total = 0.0
  with torch.no_grad():
    for s in range(0, len(inputs), 128):
      logits, _ = model(
        torch.from_numpy(inputs[s : s + 128]), torch.from_numpy(targets[s : s + 128])
      )
      y = torch.from_numpy(targets[s : s + 128])
      total += float(F.cross_entropy(logits.transpose(1, 2), y, reduction="sum"))
  return {"val_nll": total / targets.size, "targets": int(targets.size), "step": saved["iter_num"]}


def project_nll(workdir: Path, val_text: str) -> dict:
  """Mean NLL per character of the project run's exported model on the same characters."""
  import jax
  import jax.numpy as jnp

  from transformer.runs.loading import load_run

  loaded = load_run(workdir)
  ids = np.asarray(loaded.tokenizer.encode([val_text])[0], np.int32)
  inputs, targets = windows(ids)

  @jax.jit
  def nll_rows(inputs_BT, targets_BT):
    logits_BTV = loaded.model(inputs_BT).astype(jnp.float32)
    log_p_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    return -jnp.take_along_axis(log_p_BTV, targets_BT[..., None], axis=-1)[..., 0].sum(axis=1)

  total = 0.0
  for s in range(0, len(inputs), 128):
    x, y = inputs[s : s + 128], targets[s : s + 128]
    real = len(x)  # the last batch is filled up to one shape (one compilation), then cut
    x, y = (np.concatenate([a, np.repeat(a[:1], 128 - real, 0)]) for a in (x, y))
    total += float(np.asarray(nll_rows(x, y), np.float64)[:real].sum())
  return {"val_nll": total / targets.size, "targets": int(targets.size)}


# ------------------------------------------------------------------------------------------------
# Running a command pinned to one core, with its CPU time against its steps
# ------------------------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
  with open(f"/proc/{pid}/stat", "rb") as f:
    fields = f.read().rsplit(b")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _last_step(log: Path) -> int:
  try:
    with open(log, "rb") as f:
      f.seek(max(log.stat().st_size - 4096, 0))
      found = STEP_PATTERN.findall(f.read())
  except OSError:
    return -1
  return int(found[-1][0] or found[-1][1]) if found else -1


def run_sampled(command: list[str], log: Path, *, cwd: Path, env: dict, core: int | None) -> dict:
  """Runs `command` (pinned to `core`), sampling its CPU seconds against its logged step; returns
  the samples [(wall, cpu, step)] and the whole command's CPU and wall seconds."""
  if core is not None and shutil.which("taskset"):
    command = ["taskset", "-c", str(core), *command]
  start = time.perf_counter()
  with open(log, "wb") as out:
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    samples = []
    while True:
      pid, status, usage = os.wait4(process.pid, os.WNOHANG)
      if pid:  # reaped here, with its rusage: all its threads' CPU seconds
        break
      with contextlib.suppress(OSError):
        samples.append((time.perf_counter() - start, _cpu_s(process.pid), _last_step(log)))
      time.sleep(0.5)
  process.returncode = code = os.waitstatus_to_exitcode(status)
  if code:
    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
    raise RuntimeError(f"{command[-1]} ... exited {code}:\n" + "\n".join(tail))
  whole_cpu = usage.ru_utime + usage.ru_stime
  return {"samples": samples, "whole_cpu_s": whole_cpu, "whole_wall_s": time.perf_counter() - start}


def per_step(samples: list, first: int, last: int) -> dict[str, float]:
  """CPU and wall ms per step between steps `first` and `last`, from the first sample at which
  each step was the newest, leaving out intervals that hold an evaluation."""
  seen: dict[int, tuple[float, float]] = {}
  for wall, cpu, step in samples:
    seen.setdefault(int(step), (wall, cpu))
  steps = sorted(s for s in seen if first <= s <= last)
  cpu = wall = count = 0.0
  for a, b in itertools.pairwise(steps):
    if a // EVAL_EVERY != b // EVAL_EVERY or a % EVAL_EVERY == 0:
      continue
    wall += seen[b][0] - seen[a][0]
    cpu += seen[b][1] - seen[a][1]
    count += b - a
  if not count:
    return {"cpu_ms_per_step": float("nan"), "wall_ms_per_step": float("nan"), "steps": 0}
  return {
    "cpu_ms_per_step": 1e3 * cpu / count,
    "wall_ms_per_step": 1e3 * wall / count,
    "steps": count,
  }


# ------------------------------------------------------------------------------------------------
# The two commands
# ------------------------------------------------------------------------------------------------


def prepare_nanogpt(source: Path, text: str, work: Path) -> Path:
  """A copy of nanoGPT's source with data/shakespeare_char as its prepare.py writes it."""
  import pickle

  folder = work / "nanogpt"
  shutil.rmtree(folder, ignore_errors=True)
  shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".git", "assets", "*.ipynb"))
  data = folder / "data" / "shakespeare_char"
  data.mkdir(parents=True, exist_ok=True)
  chars = sorted(set(text))
  stoi = {c: i for i, c in enumerate(chars)}
  train, val = split_text(text)
  np.array([stoi[c] for c in train], np.uint16).tofile(data / "train.bin")
  np.array([stoi[c] for c in val], np.uint16).tofile(data / "val.bin")
  meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
  (data / "meta.pkl").write_bytes(pickle.dumps(meta))
  (folder / "seeded_train.py").write_text(NANOGPT_SEED)
  return folder


def run_nanogpt(folder: Path, torch_python: str, seed: int, steps: int, out: Path, core) -> dict:
  env = {**os.environ, "OMP_NUM_THREADS": "1", "SEED_SHIFT": str(seed)}
  command = [
    torch_python,
    "seeded_train.py",
    "config/train_shakespeare_char.py",
    *NANOGPT_ARGS,
    f"--max_iters={steps}",
    f"--lr_decay_iters={steps}",
    f"--out_dir={out}",
  ]
  return run_sampled(command, out.with_suffix(".log"), cwd=folder, env=env, core=core)


def run_project(text_file: Path, seed: int, steps: int, out: Path, cache: Path, core) -> dict:
  env = {**os.environ, "TRANSFORMER_CACHE_DIR": str(cache)}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  command = [
    sys.executable,
    "-m",
    "transformer.train",
    "--config=shakespeare_char",
    f"--workdir={out}",
    f"--config.data.train_files={text_file}",
    f"--config.seed={seed}",
    f"--config.num_train_steps={steps}",
    "--config.log_every_steps=10",  # finer samples of CPU time against steps
  ]
  return run_sampled(command, out.with_suffix(".log"), cwd=ROOT, env=env, core=core)


def score_nanogpt(torch_python: str, folder: Path, out: Path) -> dict:
  code = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); import lm_vs_nanogpt as b; "
    "print(json.dumps(b.nanogpt_nll(sys.argv[2], sys.argv[3], sys.argv[4])))"
  )
  args = [str(Path(__file__).parent), str(out / "ckpt.pt")]
  args += [str(folder / "data/shakespeare_char/val.bin"), str(folder)]
  done = subprocess.run(
    [torch_python, "-c", code, *args], capture_output=True, text=True, check=True
  )
  return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def fallback_text() -> str:
  """Running text for the quick preset where Tiny Shakespeare is not at hand: the German side of
  the shipped Multi30k training split."""
  from transformer.data.multi30k import DEFAULT_SOURCE_DIR, read_lines

  return "\n".join(read_lines(DEFAULT_SOURCE_DIR / "train.de.gz")) + "\n"


def main(argv=None) -> int:
  from benchmarks import common

  parser = common.argument_parser(__doc__.splitlines()[0])
  parser.add_argument(
    "--text", type=Path, default=ROOT.parent / "shared/data/tinyshakespeare/input.txt"
  )
  parser.add_argument("--nanogpt", type=Path, help="nanoGPT's source tree (karpathy/nanoGPT)")
  parser.add_argument("--torch_python", help="a Python with torch (CPU) for nanoGPT")
  parser.add_argument("--rounds", type=int, default=None, help="default: 2 (quick: 1)")
  parser.add_argument("--steps", type=int, default=None, help="default: 2000 (quick: 30)")
  parser.add_argument("--seed", type=int, default=0, help="the first round's seed (+1 a round)")
  parser.add_argument("--core", type=int, default=1, help="the core each command is pinned to")
  parser.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
  args = common.parse_args(parser, argv)
  quick = args.preset == "quick"
  rounds, steps = args.rounds or (1 if quick else 2), args.steps or (30 if quick else 2000)
  core = args.core if args.core < os.cpu_count() else None
  import tempfile

  work = args.work or Path(tempfile.mkdtemp(prefix="lm_vs_nanogpt-"))
  work.mkdir(parents=True, exist_ok=True)
  if args.text.is_file():
    text_file, text = args.text, args.text.read_text(encoding="utf-8")
  elif quick:
    text = fallback_text()
    text_file = work / "text.txt"
    text_file.write_text(text, encoding="utf-8")
  else:
    parser.error(f"--text {args.text} does not exist: give Tiny Shakespeare's input.txt")
  have_nanogpt = bool(
    args.nanogpt
    and (args.nanogpt / "train.py").is_file()
    and args.torch_python
    and shutil.which(args.torch_python)
  )
  if not have_nanogpt:
    if not quick:
      parser.error("--nanogpt (nanoGPT's source) and --torch_python (a Python with torch) needed")
    print("nanoGPT's source or torch not given: the project alone")
  folder = prepare_nanogpt(args.nanogpt, text, work) if have_nanogpt else None
  cache = work / "project_cache"
  _, val_text = split_text(text)
  results: list[dict] = []
  for r in range(rounds):
    seed = args.seed + r
    for model in ("nanogpt", "project") if have_nanogpt else ("project",):
      out = work / f"{model}_round{r + 1}"
      shutil.rmtree(out, ignore_errors=True)
      print(f"round {r + 1}: {model}, {steps} steps, seed {seed}", flush=True)
      if model == "nanogpt":
        assert folder is not None
        measured = run_nanogpt(folder, args.torch_python, seed, steps, out, core)
      else:
        measured = run_project(text_file, seed, steps, out, cache, core)
      row = {"model": model, "round": r + 1, "seed": seed, "steps": steps}
      row.update(per_step(measured["samples"], min(50, steps // 2), steps))
      row.update({k: round(measured[k], 2) for k in ("whole_cpu_s", "whole_wall_s")})
      if not quick:
        if model == "nanogpt":
          row.update(score_nanogpt(args.torch_python, folder, out))
        else:
          row.update(project_nll(out, val_text))
      print("  " + json.dumps({k: v for k, v in row.items() if k != "model"}), flush=True)
      results.append(row)
  payload = {
    "text": {"file": text_file.name, "characters": len(text), "validation": len(val_text)},
    "steps": steps,
    "rounds": rounds,
    "pinned_core": core,
    "results": results,
  }
  path = common.write_json("lm_vs_nanogpt", args.preset, payload, args.out)
  plot(path)
  return 0


def plot(path: Path) -> None:
  """Three panels: CPU ms per step, whole-command CPU s, validation NLL, each model by round."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  record = json.loads(path.read_text())
  rows = record["results"]
  panels = [
    ("cpu_ms_per_step", "CPU ms per step (1 core)"),
    ("whole_cpu_s", "whole command, CPU s"),
  ]
  if any("val_nll" in row for row in rows):
    panels.append(("val_nll", "validation NLL per character"))
  figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
  for axis, (key, title) in zip(np.atleast_1d(axes), panels, strict=True):
    labels = [f"{row['model']}\nround {row['round']}" for row in rows]
    colours = ["tab:orange" if row["model"] == "nanogpt" else "tab:blue" for row in rows]
    values = [row.get(key, float("nan")) for row in rows]
    axis.bar(range(len(rows)), values, color=colours)
    axis.set_xticks(range(len(rows)), labels, fontsize=8)
    axis.set_title(title, fontsize=10)
    if key == "val_nll":
      low = min(v for v in values if v == v)
      axis.set_ylim(low - 0.05, max(v for v in values if v == v) + 0.02)
  figure.suptitle(
    f"{record['steps']} steps of nanoGPT's shakespeare_char CPU setting "
    f"({record['environment'].get('cpu', record['environment'].get('device', ''))})",
    fontsize=9,
  )
  figure.tight_layout()
  figure.savefig(path.with_suffix(".png"), dpi=110)
  print(f"wrote {path.with_suffix('.png')}")


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "score-nanogpt":  # without JAX: the torch Python
    print(json.dumps(nanogpt_nll(*sys.argv[2:5])))
  else:
    sys.exit(main())
