#!/usr/bin/env python3
"""docs/config-reference.md, generated from the ``--help-config`` output of every command
that has one (``audioclr pretrain``, ``eval`` and ``tune``: the commands built on
``trainer.commands.config_parser``).

    python3 tools/config_reference.py                                    # print the markdown
    python3 tools/config_reference.py --write docs/config-reference.md   # refresh the page
    python3 tools/config_reference.py --check docs/config-reference.md   # exit 1 when it is stale

Each command's ``main(["--help-config"])`` runs in this process, its output is captured
and turned into tables: one per config section, then (for ``pretrain``) one per
augmentation op. A line the parser does not recognise is kept verbatim in a code block,
so a change of format shows up in the page instead of being lost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFRESH = "python3 tools/config_reference.py --write docs/config-reference.md"
if str(REPO) not in sys.path:  # run as a script: the repository's packages beside this folder
    sys.path.insert(0, str(REPO))

from trainer import cli  # noqa: E402

# (command, what its keys configure); each is `audioclr COMMAND --help-config`.
COMMANDS = (
    ("pretrain", "the keys of a recipe (`--config configs/X.yaml`) and of its dotted overrides "
                 "(`optim.lr=0.1 train.epochs=5`), then the augmentation ops an `augment:` chain can hold."),
    ("eval", "the `eval:` section of a YAML given with `--config` (e.g. the `best.yaml` of a sweep) and "
             "the `eval.a.b=v` overrides."),
    ("tune", "the keys of a sweep YAML (`configs/sweeps/*.yaml`) and of its overrides; its `eval:` "
             "section takes the keys of `audioclr eval`."),
)

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.]*) = (?P<default>.*?)"
                 r"(?: \[(?P<choices>[^\]\s]+)\])?  # (?P<doc>.*)$")
OP = re.compile(r"^  (?P<name>\w+) \[(?P<domain>\w+)\]: (?P<doc>.*)$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def help_config(command: str) -> str:
    """What ``audioclr COMMAND --help-config`` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli.COMMANDS[command][0](["--help-config"])
    if rc != 0:
        raise SystemExit(f"audioclr {command} --help-config exited {rc}")
    return out.getvalue()


def text(s: str) -> str:
    """Plain text for a table cell or a paragraph: code spans kept, ``|`` escaped
    everywhere, emphasis and HTML characters escaped outside code spans."""
    parts, last = [], 0
    for m in CODE_SPAN.finditer(s):
        parts.append(_escape(s[last:m.start()]))
        parts.append(m.group(0).replace("|", "\\|"))
        last = m.end()
    parts.append(_escape(s[last:]))
    return "".join(parts)


def _escape(s: str) -> str:
    for ch in "\\*_~<|[]":
        s = s.replace(ch, "\\" + ch)
    return s


def code(s: str) -> str:
    return "`" + s.replace("|", "\\|") + "`"


def table(rows: list[re.Match], key_prefix: str = "") -> list[str]:
    lines = ["| key | default | choices | meaning |", "|---|---|---|---|"]
    for m in rows:
        choices = ", ".join(code(c) for c in m["choices"].split("|")) if m["choices"] else ""
        lines.append(f"| {code(key_prefix + m['key'])} | {code(m['default'])} | {choices} | {text(m['doc'])} |")
    return lines


def section(command: str, about: str, output: str) -> list[str]:
    """One command's part of the page."""
    out = [f"## audioclr {command}", "", f"`audioclr {command} --help-config`: {text(about)}", ""]
    groups: dict[str, list[re.Match]] = {}
    rest: list[str] = []
    lines = output.rstrip("\n").split("\n")
    i = 0
    while i < len(lines) and lines[i].strip():
        m = KEY.match(lines[i])
        if m and not m["indent"]:
            groups.setdefault(m["key"].split(".")[0] if "." in m["key"] else "", []).append(m)
        else:
            rest.append(lines[i])
        i += 1
    for group, rows in groups.items():
        out += [f"### {group}" if group else "### top level", ""] + table(rows) + [""]
    ops = lines[i:]
    while ops and not ops[0].strip():
        ops.pop(0)
    if ops:
        out += ops_section(ops, rest)
    if rest:
        out += ["Lines of the output not read as keys:", "", "```", *rest, "```", ""]
    return out


def ops_section(lines: list[str], rest: list[str]) -> list[str]:
    """The augmentation ops ``pretrain --help-config`` lists after its keys."""
    title = lines[0].rstrip(":")
    out = ["### augment ops", "", text(title[:1].upper() + title[1:]) + ".", ""]
    op: list[str] | None = None
    rows: list[re.Match] = []

    def flush() -> None:
        if op is not None:
            out.extend(op)
            if rows:
                out.extend(table(rows) + [""])

    for line in lines[1:]:
        m_op, m_key = OP.match(line), KEY.match(line)
        if m_op:
            flush()
            op = [f"#### {m_op['name']} ({m_op['domain']})", "", text(m_op["doc"]), ""]
            rows = []
        elif m_key and m_key["indent"] == "    " and op is not None:
            rows.append(m_key)
        elif line.startswith("  every op also takes: "):
            flush()
            op, rows = None, []
            out += ["#### every op", "", "Every op also takes: " + text(line.split(": ", 1)[1]) + ".", ""]
        else:
            rest.append(line)
    flush()
    return out


def render() -> str:
    page = [
        "# Configuration reference",
        "",
        "<!-- Generated by tools/config_reference.py from `--help-config`; do not edit. "
        f"Refresh: {REFRESH} -->",
        "",
        "Every key of every command that takes a YAML config, with its default and meaning, as "
        "`audioclr COMMAND --help-config` prints it. This page is generated: "
        f"`{REFRESH}` refreshes it, and `tests/test_docs.py` fails when it is stale. How a config and "
        "its dotted overrides are read and checked: [Command line](../README.md#command-line); the "
        "recipes: [configs/README.md](../configs/README.md).",
        "",
        "Commands: " + ", ".join(f"[audioclr {c}](#audioclr-{c})" for c, _ in COMMANDS) + ".",
        "",
    ]
    for command, about in COMMANDS:
        page += section(command, about, help_config(command))
    return "\n".join(page).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", metavar="FILE", help="write the markdown to FILE (docs/config-reference.md)")
    g.add_argument("--check", metavar="FILE", help="exit 1 when FILE differs from what would be written")
    args = p.parse_args(argv)
    page = render()
    if args.write:
        Path(args.write).write_text(page, encoding="utf-8")
        print(f"wrote {args.write}", file=sys.stderr)
    elif args.check:
        path = Path(args.check)
        if not path.is_file() or path.read_text(encoding="utf-8") != page:
            print(f"{args.check} is stale: run {REFRESH}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
