"""The course: every chapter notebook runs top to bottom, and every chapter is complete (note, check, figure,
exercises). New chapters in chapters/ are picked up automatically."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = REPO_ROOT / "chapters"
NOTES = REPO_ROOT / "notes"
NOTEBOOKS = sorted(CHAPTERS.glob("*.ipynb"))
CHAPTER_NAME = re.compile(r"^\d\d_[a-z0-9_]+$")


def code_source(nb: nbformat.NotebookNode) -> str:
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path):
    """Execute a copy of the notebook (the committed file is never rewritten) from chapters/, cell by cell,
    so that a failure names the cell that broke."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(CHAPTERS)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as err:
                pytest.fail(f"{path.name}: cell {index} raised an error:\n{err}", pytrace=False)


def test_every_chapter_has_a_note_and_every_note_a_chapter():
    chapters = {p.stem for p in NOTEBOOKS}
    notes = {p.stem for p in NOTES.glob("*.md")}
    assert chapters, f"no notebooks in {CHAPTERS}"
    bad_names = sorted(name for name in chapters | notes if not CHAPTER_NAME.match(name))
    assert not bad_names, f"chapter files must be named NN_slug (two digits, lowercase slug): {bad_names}"
    assert not chapters - notes, f"notebooks without notes/NN_slug.md: {sorted(chapters - notes)}"
    assert not notes - chapters, f"notes without chapters/NN_slug.ipynb: {sorted(notes - chapters)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_chapter_is_complete(path: Path):
    """Checked against the package, committed with a figure, ends with hidden solutions."""
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"{path.name}: kernelspec must be python3"
    code = code_source(nb)
    assert re.search(r"^\s*(from|import) lillm", code, re.MULTILINE), f"{path.name}: never imports lillm"
    assert re.search(r"\bassert\b|assert_close|assert_equal", code), f"{path.name}: no assert against lillm"
    pngs = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert pngs, f"{path.name}: no committed image/png output (commit the notebook executed, with its figures)"
    solutions = [
        cell
        for cell in nb.cells
        if cell.cell_type == "markdown" and re.search(r"<details>\s*<summary>\s*Solution", cell.source, re.IGNORECASE)
    ]
    assert solutions, f"{path.name}: no hidden solution (<details><summary>Solution</summary> ... </details>)"
    errors = [
        i for i, cell in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in cell.get("outputs", []))
    ]
    assert not errors, f"{path.name}: committed with error outputs in cells {errors}"
