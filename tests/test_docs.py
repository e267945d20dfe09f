"""The documents stay true to the code: the README's option table lists every option under its group (the groups
of gigadiff.options), the README stays short, and every link points to a file inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

from gigadiff.options import GROUPS, OPTIONS, flag

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]


def option_table() -> dict[str, str]:
    """flag -> the group heading it is listed under, from the README's option table."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| option | meaning | default |") :]
    table = table[: table.index("\n\n")]
    group, listed = "", {}
    for row in table.splitlines()[2:]:
        first = row.split("|")[1].strip()
        heading = re.fullmatch(r"\*\*(.+)\*\*", first)
        if heading:
            group = heading[1].lower()
            continue
        for name in re.findall(r"`(--[\w-]+)", first):
            listed[name] = group
    return listed


def test_the_readme_lists_every_option_under_its_group():
    listed = option_table()
    for name, o in OPTIONS.items():
        if not o.commands:
            continue
        expected = flag(name) if name != "prompt" else None
        if expected is None:
            continue
        assert listed.get(expected) == o.group.lower(), f"{expected} should be listed under {o.group!r}"
    assert [g.lower() for g in GROUPS] == list(dict.fromkeys(listed.values()))


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_links_point_inside_the_repository():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)]+)\)", doc.read_text()):
            assert not re.match(r"[a-z]+://", target), f"{doc.name} links outside the repository: {target}"
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.exists() and ROOT in path.parents, f"{doc.name}: {target} is not a file of the repository"


def test_the_quick_start_leaves_the_working_tree_clean():
    """Every file the README's main job writes is ignored by git (a newcomer's clone stays clean)."""
    import shutil
    import subprocess

    import pytest

    from gigadiff.io.files import relief_path, sidecar_path

    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    text = (ROOT / "README.md").read_text()
    quick_start = text[text.index("```bash") :].split("```")[1]
    output = Path(re.search(r"-o (\S+)", quick_start)[1])
    for path in (output, sidecar_path(output), relief_path(output)):
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(path)], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} (written by the quick start) is not ignored by git"
