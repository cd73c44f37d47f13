"""The documentation's commands work: every ``cadenza ...`` line of a ``bash`` block in
README.md and docs/*.md parses with the real argument parser (including its subcommands'
choices and types), and the blocks marked ``<!-- tested -->`` run and exit 0."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from cadenza.cli import build_parser, parse_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- tested -->\s*\n)?```bash\n(.*?)```", re.S)
CADENZA = re.compile(r"^(?:\.venv/bin/)?cadenza(?:\s|$)")


def _commands(text: str):
    """(tested, command) for each command line of each bash block (comments stripped)."""
    for m in BLOCK.finditer(text):
        for line in m.group(2).replace("\\\n", " ").splitlines():
            cmd = shlex.split(line, comments=True)
            if cmd:
                yield bool(m.group(1)), line, cmd


def _all():
    return [(page.name, tested, line, cmd) for page in PAGES
            for tested, line, cmd in _commands(page.read_text())]


def test_pages_exist_and_have_commands():
    names = {p.name for p in PAGES}
    assert {"README.md", "models.md", "training.md", "data.md", "decoding.md", "kernels.md",
            "benchmarks.md"} <= names
    first = next(cmd for _, _, _, cmd in _all())  # the README's first command is the main job
    assert first == ["make", "demo"]
    assert any(t for _, t, _, _ in _all())


@pytest.mark.parametrize("page, tested, line, cmd",
                         [c for c in _all() if CADENZA.match(c[2].strip())],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_cadenza_command_parses(page, tested, line, cmd):
    parser = build_parser()
    try:
        args = parse_args(parser, cmd[1:])
    except SystemExit as e:  # argparse: 0 for --help, 2 for a parse error
        assert e.code == 0 and "--help" in cmd, f"{page}: {line!r} does not parse"
        return
    assert getattr(args, "func", None), f"{page}: {line!r} names no runnable command"


@pytest.mark.parametrize("page, tested, line, cmd", [c for c in _all() if c[1]],
                         ids=lambda x: x if isinstance(x, str) else None)
def test_tested_block_runs(page, tested, line, cmd, tmp_path):
    if CADENZA.match(line.strip()):
        cmd = [sys.executable, "-m", "cadenza", *cmd[1:]]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{page}: {line!r} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


SCRIPT = re.compile(r"<!-- tested-script -->\s*\n```bash\n(.*?)```", re.S)


@pytest.mark.parametrize("page, script", [
    pytest.param(p.name, m.group(1), id=f"{p.name}-{i}") for p in PAGES
    for i, m in enumerate(SCRIPT.finditer(p.read_text()))])
def test_tested_script_runs_as_one_and_prints_no_libtpu_lines(page, script, tmp_path,
                                                               cli_env, libtpu_noise):
    """A ``<!-- tested-script -->`` block (a recipe whose steps build on each other) runs
    as one bash script in a fresh folder, with ``cadenza`` on PATH, as a user's shell."""
    env = cli_env(PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{page}: failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert not libtpu_noise(r.stderr), r.stderr


def test_quoted_numbers_come_from_the_results_files_they_cite():
    """A docs line citing ``bench/results/<device>/<name>.md`` quotes only numbers found in
    that file (numbers with a decimal point or at least four digits)."""
    cite = re.compile(r"bench/results/[\w.-]+/[\w.-]+\.md")
    number = re.compile(r"\d+\.\d+|\d{4,}")
    checked = 0
    for page in PAGES:
        for line in page.read_text().splitlines():
            files = [ROOT / c for c in cite.findall(line) if (ROOT / c).is_file()]
            if not files:
                continue
            source = "".join(f.read_text() for f in files)
            for n in number.findall(cite.sub("", line)):
                assert n in source, f"{page.name}: {n} is not in {[f.name for f in files]}"
                checked += 1
    assert checked
