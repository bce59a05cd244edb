"""Every ```python block of README.md marked `<!-- tested -->` runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"<!-- tested -->\s*```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_tested_snippets():
  assert BLOCKS, "README.md lost its tested snippets"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  namespace = {"__name__": f"readme_snippet_{index}"}
  exec(compile(BLOCKS[index], f"README.md[snippet {index}]", "exec"), namespace)
