"""Every result table in the README is checked, cell by cell, against the committed JSON that produced it.

`benchmarks/readme_sources.json` names each source JSON with the command that wrote it, and gives each
README table row by row: one template per cell, a Python f-string evaluated on the JSONs (`d`: the
table's source, `src[name]`: any source, `r` etc.: the row's `let` bindings, helpers below). A cell whose
README text differs from its rendered template fails here, so a number can only change together with
its JSON (re-run the command) or its mapping. Every table under "## Results" (and the demo table) must be
mapped, so a new table cannot slip in unchecked.
"""

from __future__ import annotations

import fnmatch
import json
import re
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SOURCES = ROOT / "benchmarks" / "readme_sources.json"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def readme_tables(text: str) -> list[dict]:
    """Markdown tables: header cells, data rows (separator row dropped), the section they sit in."""
    tables, section, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|(\s*:?-+:?\s*\|)+\s*$", lines[i + 1]):
            rows, j = [], i + 2
            while j < len(lines) and lines[j].startswith("|"):
                rows.append(_cells(lines[j]))
                j += 1
            tables.append({"header": _cells(line), "rows": rows, "section": section, "line": i + 1})
            i = j
            continue
        i += 1
    return tables


def _norm(cell: str) -> str:
    return re.sub(r"\s+", " ", cell.replace("**", "")).strip()


# helpers the templates may use
def pick(rows: list[dict], **match) -> dict:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"{len(found)} rows match {match}"
    return found[0]


def sp(x: float, nd: int = 0) -> str:
    """Thousands separated by a space: 19 329, 772 512."""
    return f"{x:,.{nd}f}".replace(",", " ")


def mean(xs) -> float:
    return statistics.fmean(list(xs))


HELPERS = {"pick": pick, "sp": sp, "mean": mean, "min": min, "max": max, "round": round, "len": len, "sum": sum, "abs": abs,
           "sorted": sorted, "next": next, "all": all, "any": any, "zip": zip, "range": range, "float": float, "int": int,
           "str": str, "list": list, "dict": dict}


def _load_sources(spec: dict) -> dict[str, dict]:
    return {name: json.loads((ROOT / s["file"]).read_text()) for name, s in spec["sources"].items()}


def _env(sources: dict, default: str, let: dict) -> dict:
    """The names a row's templates see: helpers, every source (src), the table's source (d), the row's bindings."""
    env = {"__builtins__": {}, **HELPERS, "src": sources, "d": sources[default]}
    for name, expr in let.items():
        env[name] = eval(expr, env)  # noqa: S307 - expressions from this repository's own mapping file
    return env


def _render(template: str, env: dict) -> str:
    return eval("f" + repr(template), env)  # noqa: S307


@pytest.fixture(scope="module")
def spec():
    return json.loads(SOURCES.read_text())


@pytest.fixture(scope="module")
def sources(spec):
    return _load_sources(spec)


@pytest.fixture(scope="module")
def tables():
    return readme_tables(README.read_text())


def _find(tables: list[dict], header: list[str]) -> dict:
    found = [t for t in tables if [_norm(c) for c in t["header"]] == [_norm(c) for c in header]]
    assert len(found) == 1, f"{len(found)} README tables with header {header}"
    return found[0]


def test_every_source_exists_and_records_its_run(spec, sources):
    text = README.read_text()
    for name, s in spec["sources"].items():
        data = sources[name]
        commit = (data.get("git_commit") or (data.get("environment") or {}).get("git") or (data.get("run") or {}).get("git_commit")
                  or (data.get("provenance_annotation") or {}).get("last_changed_in_commit"))
        assert commit, f"{s['file']}: no git commit recorded"
        assert s.get("command"), f"{name}: no command"
        if s.get("model", True):
            prov = data.get("model_provenance")
            assert prov and "Q4_1" in prov["weights"], f"{s['file']}: no model_provenance"
        name = Path(s["file"]).name
        named = name in text or any(fnmatch.fnmatch(name, Path(g).name) for g in re.findall(r"`([^`\s]*\*[^`\s]*)`", text))
        assert named, f"the README never names {s['file']} (nor a pattern that matches it)"
        script = s["command"].split()[1] if s["command"].startswith("python ") else None
        if script:
            assert (ROOT / script).is_file(), f"{name}: {script} does not exist"


def test_every_results_table_is_mapped(spec, tables):
    mapped = {tuple(_norm(c) for c in t["header"]) for t in spec["tables"]}
    for t in tables:
        if t["section"] in ("Results", "Two commands") or t["section"].startswith("Use it"):
            assert tuple(_norm(c) for c in t["header"]) in mapped, f"README line {t['line']}: table {t['header']} is not in readme_sources.json"


def _table_ids(spec):
    return [" | ".join(t["header"][:2]) for t in spec["tables"]]


@pytest.mark.parametrize("index", range(len(json.loads(SOURCES.read_text())["tables"])),
                         ids=_table_ids(json.loads(SOURCES.read_text())))
def test_table_cells_match_their_json(index, spec, sources, tables):
    t = spec["tables"][index]
    found = _find(tables, t["header"])
    assert len(found["rows"]) == len(t["rows"]), f"README table at line {found['line']}: {len(found['rows'])} rows, mapping has {len(t['rows'])}"
    wrong = []
    for k, (row, want) in enumerate(zip(found["rows"], t["rows"])):
        env = _env(sources, want.get("source", t["source"]), {**t.get("let", {}), **want.get("let", {})})
        cells = want["cells"]
        assert len(cells) == len(row), f"README line {found['line'] + 2 + k}: {len(row)} cells, mapping has {len(cells)}"
        for col, (got, template) in enumerate(zip(row, cells)):
            expected = _render(template, env)
            if _norm(got) != _norm(expected):
                wrong.append(f"row {k + 1} ({row[0]!r}), column {found['header'][col]!r}: README {got!r}, JSON gives {expected!r}")
    assert not wrong, f"README table at line {found['line']}:\n" + "\n".join(wrong)


def test_the_check_fails_on_a_changed_number(spec, sources, tables):
    """The checker itself: one README cell changed by one digit is reported."""
    t = next(t for t in spec["tables"] if t["source"] == "cmoe_layouts")
    found = _find(tables, t["header"])
    row = list(found["rows"][0])
    col = next(i for i, c in enumerate(row) if re.search(r"\d\.\d", c))
    row[col] = re.sub(r"(\d)(?=\D*$)", lambda m: str((int(m.group(1)) + 1) % 10), row[col])
    want = t["rows"][0]
    env = _env(sources, want.get("source", t["source"]), {**t.get("let", {}), **want.get("let", {})})
    assert _norm(row[col]) != _norm(_render(want["cells"][col], env))
