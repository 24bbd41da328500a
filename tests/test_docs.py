"""The code blocks of README.md and docs/*.md run, so the documentation cannot drift."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run(path: Path) -> None:
    blocks = python_blocks(path)
    namespace: dict = {}
    for block in blocks:  # blocks of one file share a namespace, like a reader's session
        exec(compile(block, f"{path.name}", "exec"), namespace)


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first_block is not None
    assert "make demo" in first_block.group(1) and "make test" in first_block.group(1)
