"""The course: every chapter notebook runs top to bottom (its solution cells too), every chapter is complete
(note, check against lillm, figure, exercises with folded executable solutions), and every number a note or a
markdown cell quotes from a run is the number the committed outputs show. New chapters in chapters/ are picked
up automatically.

Quoting convention: write the number followed by an HTML comment naming the output it comes from,
`3.25<!-- out: lillm BPETokenizer 300:1.50 512:2.47 1024: -->`. The label is looked up in the text outputs of the
chapter's committed notebook; it must occur exactly once there, followed (after spaces, ':' or '=') by a number
that rounds to the quoted one at the quoted precision. A rendered note shows only the number."""

from __future__ import annotations

import re
from decimal import Decimal
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
SOLUTION_HEADER = re.compile(r"^# Solution to exercise (\d+)\b")
NUMBER = r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?"
QUOTE = re.compile(r"(?P<number>" + NUMBER + r")[^<\d]{0,3}<!--\s*out:\s*(?P<label>.+?)\s*-->")


def code_source(nb: nbformat.NotebookNode) -> str:
    return "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")


def is_solution(cell: nbformat.NotebookNode) -> bool:
    return cell.cell_type == "code" and "solution" in cell.metadata.get("tags", [])


def text_outputs(nb: nbformat.NotebookNode) -> str:
    """Everything the committed notebook printed or displayed as text, cell after cell."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "text/plain" in out.get("data", {}):
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


def quoted_number_errors(text: str, outputs: str, where: str) -> list[str]:
    """One message per quoted number (QUOTE markers in text) that is not what the outputs show."""
    errors = []
    for quote in QUOTE.finditer(text):
        label, quoted = quote["label"], quote["number"]
        hits = list(re.finditer(re.escape(label) + r"[\s:=]*(" + NUMBER + ")", outputs))
        if len(hits) != 1:
            errors.append(f"{where}: label {label!r} occurs {len(hits)} times followed by a number in the outputs (need 1)")
            continue
        shown = hits[0][1]
        q, v = float(quoted.replace(",", "")), float(shown.replace(",", ""))
        last_digit = 10.0 ** Decimal(quoted.replace(",", "")).as_tuple().exponent  # 1.50 -> 0.01, 7.6e-06 -> 1e-07
        if abs(q - v) > 0.5 * last_digit * (1 + 1e-9):
            errors.append(f"{where}: quotes {quoted} for {label!r}, the output shows {shown}")
    return errors


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
    old_style = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "markdown" and re.search(r"<details>\s*<summary>[^<]*(solution|answer)", cell.source, re.IGNORECASE)
    ]
    assert not old_style, f"{path.name}: markdown <details> solutions in cells {old_style}; make them solution code cells"
    solutions = [cell for cell in nb.cells if is_solution(cell)]
    assert solutions, f"{path.name}: no solution cells (code cells tagged 'solution', source hidden)"
    numbers = []
    for cell in nb.cells:
        header = SOLUTION_HEADER.match(cell.source) if cell.cell_type == "code" else None
        if not (header or is_solution(cell)):
            continue
        assert header and is_solution(cell), f"{path.name}: a solution cell needs the tag 'solution' and the first line '# Solution to exercise N': {cell.source[:60]!r}"
        assert cell.metadata.get("jupyter", {}).get("source_hidden") is True, f"{path.name}: solution {header[1]} is not folded (metadata jupyter.source_hidden)"
        assert cell.get("execution_count") is not None, f"{path.name}: solution {header[1]} was not executed before committing"
        numbers.append(int(header[1]))
    assert numbers == sorted(set(numbers)) and numbers[0] == 1, f"{path.name}: solutions must be numbered 1, 2, ... in order, got {numbers}"
    errors = [
        i for i, cell in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in cell.get("outputs", []))
    ]
    assert not errors, f"{path.name}: committed with error outputs in cells {errors}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_quoted_numbers_match_the_outputs(path: Path):
    """Numbers quoted in the chapter's note and markdown cells (see the module docstring) are the outputs'."""
    nb = nbformat.read(path, as_version=4)
    outputs = text_outputs(nb)
    errors = []
    note = NOTES / f"{path.stem}.md"
    if note.is_file():
        errors += quoted_number_errors(note.read_text(encoding="utf-8"), outputs, note.name)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            errors += quoted_number_errors(cell.source, outputs, f"{path.name} cell {index}")
    assert not errors, "\n".join(errors)


def test_quoted_number_check_catches_a_drift():
    """The checker itself: a matching quote passes, a drifted one, an unknown label and an ambiguous one fail."""
    outputs = "rope inside: 1.792\nnope inside: 2.254\nratio 1.01\nratio 1.02"
    assert not quoted_number_errors("RoPE 1.79<!-- out: rope inside -->", outputs, "x")
    assert quoted_number_errors("RoPE 1.80<!-- out: rope inside -->", outputs, "x")
    assert quoted_number_errors("3<!-- out: missing label -->", outputs, "x")
    assert quoted_number_errors("1.01<!-- out: ratio -->", outputs, "x")
    assert not quoted_number_errors("about 2.3<!-- out: nope inside: -->", outputs, "x")
    assert not quoted_number_errors("7.6e-06<!-- out: diff -->", "diff 7.62e-06", "x")
    assert quoted_number_errors("7.6e-06<!-- out: diff -->", "diff 7.7e-06", "x")
