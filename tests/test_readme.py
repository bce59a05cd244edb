"""The code in README.md and docs/*.md is code that runs.

* A ```python block marked `<!-- tested -->` runs here as written.
* A block marked `<!-- tested in tests/test_x.py -->` needs set-up the page leaves out (a
  checkpoint on disk, PyTorch, a side venv). That test file runs it: either it holds a snippet
  equal, line for line, to the block (a module-level string constant named `README_*`, run with
  `exec`, or the lines between `# --- README snippet ---` and `# --- end snippet ---`,
  dedented), or it reads the page and runs the blocks marked with its own name.

No other spelling of the marker is accepted, and `MARKED` holds the least count of each page's
blocks, so a block that moves between pages moves its count, and one that disappears fails here.
"""

import ast
import importlib.util
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
TEXT = {page: (ROOT / page).read_text() for page in PAGES}

RUN_AS_WRITTEN = re.compile(r"<!-- tested -->\s*```python\n(.*?)```", flags=re.S)
PINNED_TO = re.compile(r"<!-- tested in (\S+) -->\s*```python\n(.*?)```", flags=re.S)
ANY_MARKER = re.compile(r"<!-- *tested\b[^>]*-->")

BLOCKS = [(page, block) for page in PAGES for block in RUN_AS_WRITTEN.findall(TEXT[page])]
PINNED = [(page, path, block) for page in PAGES for path, block in PINNED_TO.findall(TEXT[page])]

# Per page, at least: (blocks run as written, blocks pinned to a test file).
MARKED = {
    "README.md": (1, 2),
    "docs/injection.md": (0, 1),
    "docs/models.md": (0, 2),
    "docs/merge_export.md": (0, 3),
    "docs/kernels.md": (0, 1),
    "docs/tunix.md": (0, 1),
}
# Before issue 24 moved sections out of the README (main 430a4ae): README 1 run as written and
# 8 pinned, docs/tunix.md 1 pinned, docs/kernels.md 1 run by tests/test_targets.py.
BEFORE = (1, 10)


def snippets_in(path: pathlib.Path) -> list[str]:
  """The page snippets a test file runs, normalised (stripped)."""
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


def reads_page_blocks(path: pathlib.Path, page: str) -> bool:
  """Whether a test file reads `page` and picks the blocks marked with its own name."""
  text = path.read_text()
  own = path.relative_to(ROOT).as_posix()
  return pathlib.Path(page).name in text and f"<!-- tested in {own} -->" in text


def counts(page: str) -> tuple[int, int]:
  return len(RUN_AS_WRITTEN.findall(TEXT[page])), len(PINNED_TO.findall(TEXT[page]))


def test_no_marked_block_was_lost():
  lost = {page: (counts(page) if page in TEXT else "page gone", least)
          for page, least in MARKED.items()
          if page not in TEXT or any(n < m for n, m in zip(counts(page), least))}
  assert not lost, f"marked blocks lost (found, expected at least): {lost}; if a block moved, " \
                   "move its count in MARKED"
  totals = tuple(sum(counts(page)[i] for page in PAGES) for i in range(2))
  assert totals[0] >= BEFORE[0] and sum(totals) >= sum(BEFORE), (totals, BEFORE)


@pytest.mark.parametrize("page", PAGES)
def test_every_marker_is_one_of_the_two_forms(page):
  """A misspelt marker, or one not followed by a python block, would drop a block silently."""
  markers = ANY_MARKER.findall(TEXT[page])
  assert len(markers) == sum(counts(page)), (
      f"{page}: a `<!-- tested ... -->` marker is not `<!-- tested -->` or "
      f"`<!-- tested in tests/x.py -->` directly above a ```python block: {markers}")


def test_readme_is_short_and_keeps_its_two_commands():
  readme = TEXT["README.md"]
  assert len(readme.splitlines()) <= 220, "the README is the front door: keep it near 200 lines"
  first_block = re.search(r"```bash\n(.*?)```", readme, flags=re.S).group(1).splitlines()
  assert [line.split("#")[0].strip() for line in first_block] == ["make demo", "make test"]


@pytest.mark.parametrize("index", range(len(BLOCKS)),
                         ids=[f"{page}[{i}]" for i, (page, _) in enumerate(BLOCKS)])
def test_block_runs(index, tmp_path, monkeypatch):
  page, block = BLOCKS[index]
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": f"page_snippet_{index}"}
  exec(compile(block, f"{page}[snippet {index}]", "exec"), namespace)  # pylint: disable=exec-used


@pytest.mark.parametrize("page,path,block", PINNED,
                         ids=[f"{page}:{path}" for page, path, _ in PINNED])
def test_pinned_block_is_the_tested_one(page, path, block):
  source = ROOT / path
  assert source.is_file(), f"{page} points at {path}, which does not exist"
  if reads_page_blocks(source, page):
    return
  candidates = snippets_in(source)
  assert candidates, f"{path} runs no snippet of {page}"
  assert block.strip() in candidates, (
      f"{page} block differs from every snippet {path} runs; first lines:\n"
      + "\n".join(block.strip().splitlines()[:3]))


CONFIG_ARG = re.compile(r"--config=(configs/[\w/]+\.py)(?::(\w+))?")


@pytest.mark.parametrize("page", PAGES)
def test_train_commands_name_existing_configs(page):
  """Every `--config=configs/x.py[:preset]` a page shows builds its config (no drift)."""
  for path, preset in sorted(set(CONFIG_ARG.findall(TEXT[page]))):
    assert (ROOT / path).is_file(), f"{page}: {path} does not exist"
    spec = importlib.util.spec_from_file_location(f"page_config_{pathlib.Path(path).stem}",
                                                  ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
    assert config is not None, f"{page}: {path}:{preset} built nothing"


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
  """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
  out = set()
  for heading in re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", markdown, flags=re.S),
                            flags=re.M):
    out.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
  return out


@pytest.mark.parametrize("page", PAGES + ["bench/RESULTS.md"])
def test_relative_links_resolve(page):
  """A link to a moved section or file would otherwise rot silently."""
  for target in LINK.findall((ROOT / page).read_text()):
    if re.match(r"[a-z]+://", target):
      continue
    path, _, anchor = target.partition("#")
    file = (ROOT / page).parent / path if path else ROOT / page
    assert file.exists(), f"{page} links to {target}: no such file"
    if anchor and file.suffix == ".md":
      assert anchor in anchors(file.read_text()), f"{page} links to {target}: no such heading"


def test_config_overrides_name_existing_fields():
  """Every `--config.a.b=` a page shows is a field of the trainer's config schema."""
  from randlora_jax.train.config import base_config  # pylint: disable=import-outside-toplevel
  schema = base_config()
  for page in PAGES:
    for path in sorted(set(re.findall(r"--config\.([a-z_][\w.]*\w)", TEXT[page]))):
      node = schema
      for key in path.split("."):
        assert key in node, f"{page}: --config.{path} is not a config field"
        node = node[key]


def test_snippet_extraction_finds_both_forms(tmp_path):
  f = tmp_path / "t.py"
  f.write_text("README_A = '''\nx = 1\n'''\n\ndef test():\n  # --- README snippet ---\n"
               "  y = 2\n  if y:\n    z = 3\n  # --- end snippet ---\n")
  assert snippets_in(f) == ["x = 1", "y = 2\nif y:\n  z = 3"]


def test_markers_are_told_apart():
  page = ("<!-- tested -->\n```python\nx = 1\n```\n<!-- tested in tests/a.py -->\n"
          "```python\ny = 2\n```\n<!-- tested (tests/a.py) -->\n```python\nz = 3\n```\n")
  assert RUN_AS_WRITTEN.findall(page) == ["x = 1\n"]
  assert PINNED_TO.findall(page) == [("tests/a.py", "y = 2\n")]
  assert len(ANY_MARKER.findall(page)) == 3  # the third spelling is counted, so it fails
