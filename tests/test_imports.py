"""The package's parts import each other one way: no cycle, imports inside functions included.

A part is a sub-package or top-level module of `transformer` (model, data, train, ...). The
layers below are the intended direction, lowest first: a part may import only parts listed
before it, which rules out every cycle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "transformer"
RECIPES = ROOT / "configs"  # installed as transformer.configs

# Lowest first. Each part may import the parts before it (not all of them need to).
LAYERS = [
  "startup",  # a command's first second (signals, JAX's import): standard library only
  "errors",  # UserError: what the user can fix, for every part
  "allocator",  # glibc malloc kept from handing XLA:CPU's buffers back each step
  "files",  # files written whole or not at all; the cache folder runs share
  "compilation_cache",  # JAX's persistent compilation cache under that cache folder
  "parallel",  # meshes, sharding rules, train-step strategies
  "model",  # the Transformer; logical axis names from parallel
  "baselines",  # the LSTM/GRU models measured against it
  "data",  # text -> tokenizer -> token cache -> batches
  "decode",  # search over a model, BLEU
  "config",  # the run's record: the blocks assembled, config.json read and written
  "runs",  # a run on disk: checkpoints, the exported model, loading for use, Translator
  "inspect",  # attention maps and figures
  "cli",  # command-line conventions: one-line errors, recipe names
  "train",  # the training loop, its config schema, the training command
  "configs",  # recipes: values of train's schema
  "translate",
  "sample",
  "evaluate",
  "visualize",  # the other commands
  "export",  # a run's model as Hugging Face MarianMT and CTranslate2 folders
]


def imports_of_part() -> dict[str, set[str]]:
  """{part: the other parts it imports anywhere in its files}."""
  edges: dict[str, set[str]] = {}
  files = [(path, path.relative_to(PACKAGE).parts[0]) for path in PACKAGE.rglob("*.py")]
  files += [(path, "configs") for path in RECIPES.glob("*.py")]
  for path, top in files:
    part = top.removesuffix(".py")
    if part == "__init__":
      continue
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      for name in names:
        pieces = name.split(".")
        if len(pieces) > 1 and pieces[0] == "transformer" and pieces[1] != part:
          edges.setdefault(part, set()).add(pieces[1])
  return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(edges.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(edges):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_cycle_finder_finds_a_lazy_import_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_cycle_between_parts():
  edges = imports_of_part()
  assert edges, "no imports found: is PACKAGE right?"
  assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_every_part_is_layered_and_imports_only_lower_layers():
  parts = {
    p.name.removesuffix(".py")
    for p in PACKAGE.iterdir()
    if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "__init__.py"
  } | {"configs"}
  assert parts - {"__main__"} <= set(LAYERS), f"parts missing from LAYERS: {parts - set(LAYERS)}"
  rank = {part: i for i, part in enumerate(LAYERS)}
  upward = sorted(
    (part, other)
    for part, others in imports_of_part().items()
    for other in others
    if rank[other] > rank[part]
  )
  assert not upward, f"imports against the layering (part, imported): {upward}"
