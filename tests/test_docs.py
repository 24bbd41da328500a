"""The code blocks of README.md and docs/*.md run, so the documentation cannot drift.

A ```python block directly followed by a ```text block (only blank lines between them) must
print exactly that text. The tutorial exists in English and Korean: both must hold the same
programs (comments and layout may differ), the same outputs and the same figures, and each
figure must be the one its command (written next to it) draws.
"""

import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from gapnet import explain
from gapnet.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TUTORIALS = [ROOT / "docs" / "tutorial.md", ROOT / "docs" / "tutorial.ko.md"]
FENCE = re.compile(r"```(\w*)\n(.*?)```", flags=re.S)
FIGURE = re.compile(r"!\[[^\]]*\]\(([^)]+\.png)\)")
DRAWN_WITHOUT_A_MODEL = ("maxpool", "avgpool", "head")  # their figures can be redrawn here


def python_blocks(path: Path) -> list[tuple[str, str | None]]:
    """Each ```python block of a file, with the ```text block right after it (or None)."""
    text = path.read_text()
    fences = list(FENCE.finditer(text))
    blocks = []
    for i, fence in enumerate(fences):
        if fence.group(1) != "python":
            continue
        after = fences[i + 1] if i + 1 < len(fences) else None
        shown = (
            after is not None
            and after.group(1) == "text"
            and not text[fence.end() : after.start()].strip()  # only blank lines between
        )
        blocks.append((fence.group(2), after.group(2) if shown and after else None))
    return blocks


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run_and_print_what_the_document_shows(path: Path) -> None:
    namespace: dict = {}
    for number, (code, expected) in enumerate(python_blocks(path), 1):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # blocks of one file share a namespace
            exec(compile(code, f"{path.name}, python block {number}", "exec"), namespace)
        if expected is not None:
            assert printed.getvalue() == expected, f"{path.name}, python block {number}"


def test_the_tutorial_has_output_blocks_to_check() -> None:
    """The convention is in use: a block whose output is shown cannot silently stop checking."""
    blocks = python_blocks(TUTORIALS[0])
    assert len(blocks) >= 10
    assert sum(output is not None for _, output in blocks) == len(blocks)


def test_english_and_korean_tutorials_run_the_same_code_to_the_same_output() -> None:
    english, korean = (python_blocks(path) for path in TUTORIALS)
    assert len(english) == len(korean)
    for number, ((code_en, out_en), (code_ko, out_ko)) in enumerate(
        zip(english, korean, strict=True), 1
    ):
        same = ast.dump(ast.parse(code_en)) == ast.dump(ast.parse(code_ko))
        assert same, f"python block {number}: the two tutorials run different code"
        assert out_en == out_ko, f"python block {number}: different output shown"


def figures(path: Path) -> list[Path]:
    return [(path.parent / link).resolve() for link in FIGURE.findall(path.read_text())]


def test_both_tutorials_show_the_same_figures_and_the_command_that_drew_each() -> None:
    assert figures(TUTORIALS[0]) == figures(TUTORIALS[1])
    for path in [*TUTORIALS, ROOT / "README.md"]:
        text = path.read_text()
        for figure in figures(path):
            assert figure.is_file(), f"{path.name} shows {figure}, which does not exist"
            command = explain.figure_metadata(figure)["command"]
            assert command in text, f"{path.name} does not say that {command!r} drew {figure}"


TUTORIAL_FIGURES = sorted(set(figures(TUTORIALS[0])))


@pytest.mark.parametrize("figure", TUTORIAL_FIGURES, ids=lambda p: p.name)
def test_each_figure_is_what_its_command_draws_now(figure: Path, tmp_path: Path) -> None:
    """The model-free figures are redrawn; figures of trained models (gap, cam) come from the
    demo's runs, which the lead regenerates at release: for those the labels are checked."""
    meta = explain.figure_metadata(figure)
    with Image.open(figure) as im:
        size = im.size
    assert size[1] == explain.figure_size(meta["topic"], size[0])[1]
    if meta["topic"] not in DRAWN_WITHOUT_A_MODEL:
        key = {"gap": "means", "cam": "box"}[meta["topic"]]
        assert meta["labels"][key], f"{figure.name} shows no {key}"
        return
    argv = shlex.split(meta["command"])[1:]
    out = argv.index("--out") + 1
    argv[out] = str(tmp_path / "again.png")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    again = explain.figure_metadata(tmp_path / "again.png")
    assert again["labels"] == meta["labels"], f"{figure.name} is stale: run {meta['command']}"
    with Image.open(tmp_path / "again.png") as im:
        assert im.size == size


def test_readme_starts_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first_block is not None
    assert "make demo" in first_block.group(1) and "make test" in first_block.group(1)
