"""The README's code is code that runs.

* A ```python block marked `<!-- tested -->` runs here as written.
* A block marked `<!-- tested in tests/test_x.py -->` needs set-up the README leaves out (a
  checkpoint on disk, PyTorch): it must equal, line for line, a snippet that test file runs:
  a module-level string constant named `README_*` (run with `exec`), or the lines between
  `# --- README snippet ---` and `# --- end snippet ---` (dedented).
"""

import ast
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"<!-- tested -->\s*```python\n(.*?)```", README, flags=re.S)
PINNED = re.findall(r"<!-- tested in (\S+) -->\s*```python\n(.*?)```", README, flags=re.S)


def snippets_in(path: pathlib.Path) -> list[str]:
  """The README snippets a test file runs, normalised (stripped)."""
  text = path.read_text()
  out = []
  for node in ast.parse(text).body:
    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        and any(isinstance(t, ast.Name) and t.id.startswith("README_") for t in node.targets)):
      out.append(node.value.value.strip())
  for body in re.findall(r"\n([ \t]*)# --- README snippet ---\n(.*?)\n[ \t]*# --- end snippet ---",
                         text, flags=re.S):
    out.append(textwrap.dedent(body[0] + body[1]).strip())
  return out


def test_readme_has_tested_snippets():
  assert BLOCKS, "README.md lost its tested snippets"
  assert len(PINNED) >= 5, "README.md lost its snippets pinned to tests"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": f"readme_snippet_{index}"}
  exec(compile(BLOCKS[index], f"README.md[snippet {index}]", "exec"), namespace)


@pytest.mark.parametrize("path,block", PINNED, ids=[p for p, _ in PINNED])
def test_readme_snippet_is_the_tested_one(path, block):
  source = ROOT / path
  assert source.is_file(), f"README points at {path}, which does not exist"
  candidates = snippets_in(source)
  assert candidates, f"{path} runs no README snippet"
  assert block.strip() in candidates, (
      f"README block differs from every snippet {path} runs; first lines:\n"
      + "\n".join(block.strip().splitlines()[:3]))


def test_snippet_extraction_finds_both_forms(tmp_path):
  f = tmp_path / "t.py"
  f.write_text("README_A = '''\nx = 1\n'''\n\ndef test():\n  # --- README snippet ---\n"
               "  y = 2\n  if y:\n    z = 3\n  # --- end snippet ---\n")
  assert snippets_in(f) == ["x = 1", "y = 2\nif y:\n  z = 3"]
