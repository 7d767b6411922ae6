"""The documentation holds together: README.md stays a short front page whose first block
is the command CI runs, every relative link in README.md, docs/*.md and configs/README.md
leads to a file (and heading) that exists, every recipe is listed, and
docs/config-reference.md is what ``--help-config`` prints today."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, REPO / "configs" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
REFRESH = "python3 tools/config_reference.py --write docs/config-reference.md"

FENCE = re.compile(r"^(```|~~~)")
CODE_SPAN = re.compile(r"(`+).+?\1")
LINK = re.compile(r"(?<![\\!])\[([^\]]*)\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append((n, line))
    return out


def fenced_blocks(path: Path) -> list[list[str]]:
    blocks, current = [], None
    for line in path.read_text(encoding="utf-8").split("\n"):
        if FENCE.match(line.lstrip()):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to
    hyphens, a -N suffix on repeats."""
    seen: dict[str, int] = {}
    for _, line in prose_lines(path):
        m = HEADING.match(line)
        if not m:
            continue
        title = CODE_SPAN.sub(lambda c: c.group(0).strip("`"), m.group(2))
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 250, (f"README.md has {lines} lines (at most 250): move the detail into a page of docs/ "
                          "and link it from the README")


def test_readme_opens_with_the_commands_ci_runs():
    """.ci/run runs the README's test command (pip quiet); both commands stay in the first block."""
    first = fenced_blocks(README)[0]
    text = "\n".join(first)
    assert "python3 -m pip install -e . && audioclr demo --out runs/demo" in text, first
    assert "python3 -m pip install -e '.[test]' && python3 -m pytest -q -n 2" in text, first
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if "pip install" in line and not line.lstrip().startswith("#")]
    assert ci, ".ci/run no longer installs with pip: update this test and the README together"
    readme_form = ci[-1].replace("pip install -q ", "pip install ")
    assert readme_form in text, (f".ci/run runs {ci[-1]!r}, but README.md's first block does not hold "
                                 f"{readme_form!r}: keep the two the same")


def test_relative_links_lead_somewhere():
    broken = []
    for page in PAGES:
        for n, line in prose_lines(page):
            for m in LINK.finditer(CODE_SPAN.sub("", line)):
                target = m.group(2)
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                dest = (page.parent / file_part).resolve() if file_part else page
                where = f"{page.relative_to(REPO)}:{n}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{where} (no heading '#{anchor}' in {dest.relative_to(REPO)})")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_every_recipe_is_listed():
    readme = README.read_text(encoding="utf-8")
    recipes = (REPO / "configs" / "README.md").read_text(encoding="utf-8")
    missing = [f"README.md: {p.name}" for p in sorted((REPO / "configs").glob("*.yaml"))
               if f"configs/{p.name}" not in readme]
    missing += [f"configs/README.md: {p.relative_to(REPO / 'configs')}"
                for p in sorted((REPO / "configs").rglob("*.yaml"))
                if str(p.relative_to(REPO / "configs")) not in recipes]
    assert not missing, ("recipes missing from the recipe tables (a row in README.md's Recipes, "
                         "and configs/README.md):\n" + "\n".join(missing))


def test_docs_index_lists_every_page():
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.name != "README.md"
               and f"]({p.name})" not in index]
    assert not missing, f"docs/README.md does not link {', '.join(missing)}"


def test_config_reference_is_fresh():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "tools" / "config_reference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    page = (REPO / "docs" / "config-reference.md").read_text(encoding="utf-8")
    fresh = tool.render()
    if page != fresh:
        import difflib
        diff = "".join(list(difflib.unified_diff(page.splitlines(True), fresh.splitlines(True),
                                                 "docs/config-reference.md", "--help-config now"))[:40])
        raise AssertionError(f"docs/config-reference.md is stale (a config key, default or doc changed): "
                             f"run `{REFRESH}` and commit it\n{diff}")
