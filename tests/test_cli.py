"""The ``cadenza`` command line: help, config show, and clean user errors."""

import subprocess
import sys

import pytest

from cadenza.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cadenza", *args], capture_output=True,
                          text=True, timeout=120)


def test_help_lists_subcommands():
    r = _run("--help")
    assert r.returncode == 0 and "config" in r.stdout and "quickstart" in r.stdout


def test_config_show_prints_resolved_config(capsys):
    assert main(["config", "show", "tiny_pretrain", "train.steps=5", "model.num_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "num_layers: 3" in out and "preset: tiny" in out


@pytest.mark.parametrize("args, needle", [
    (["config", "show", "tiny_pretrain", "train.stepz=5"], "Did you mean 'steps'?"),
    (["config", "show", "no_such_experiment"], "not found"),
    (["config", "show", "tiny_pretrain", "model.num_layers=0"], "1 <= num_layers"),
])
def test_user_error_is_one_line_exit_2_no_traceback(args, needle):
    r = _run(*args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_debug_flag_shows_traceback():
    r = _run("--debug", "config", "show", "tiny_pretrain", "train.stepz=5")
    assert r.returncode != 0 and "Traceback" in r.stderr



def test_config_list_names_every_experiment_and_preset_on_one_line(capsys):
    from cadenza.config import CONFIG_ROOT

    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    for folder in ("experiments", "models"):
        for f in (CONFIG_ROOT / folder).glob("*.yaml"):
            (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [f.stem]]
            assert len(line.split()) > 1, line  # with its description
    # descriptions cite only documents users have (the repository's own .md files)
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    shipped = {p.name for p in root.glob("*.md")} | {p.name for p in root.glob("docs/*.md")}
    assert set(re.findall(r"[\w./-]+\.md\b", out)) <= shipped | {f"docs/{n}" for n in shipped}
    assert not re.search(r"\.\./", out)  # and no path outside the repository


def _help(capsys, *command) -> str:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    return capsys.readouterr().out


def test_every_option_has_help_and_shows_its_default(capsys):
    import argparse

    from cadenza.cli import build_parser

    def options(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from options(child)
            elif action.option_strings and action.help != argparse.SUPPRESS:
                yield parser, action

    for parser, action in options(build_parser()):
        assert action.help, f"{parser.prog} {action.option_strings} has no help"
    text = _help(capsys, "convert", "check")
    assert "random prompts (default: 3)" in text and "(default: None)" not in text
    assert "decode section, 64" in _help(capsys, "generate")


@pytest.mark.parametrize("given, meant", [
    (r"\n\n", "\n\n"), (r"a\tb", "a\tb"), (r"\\n", "\\n"), (r"\x41\u00e9", "A\u00e9"),
    ("\u00e9\n", "\u00e9\n"), (r"\q", r"\q")])
def test_stop_escapes(given, meant):
    from cadenza.decode.cli import unescape

    assert unescape(given) == meant


def test_stop_flag_reaches_the_decode_config_unescaped():
    from cadenza.cli import build_parser, parse_args
    from cadenza.decode.cli import _decode_config
    from cadenza.decode.config import DecodeConfig

    args = parse_args(build_parser(), ["generate", "--checkpoint", "m", "--prompt", "p",
                                       "--stop", r"\n\n", "--stop", "END"])
    assert _decode_config(DecodeConfig(), args, None).stop == ["\n\n", "END"]


def test_importing_cadenza_before_jax_prints_no_libtpu_lines(cli_env, libtpu_noise):
    r = subprocess.run([sys.executable, "-c", "import cadenza.models, jax; print(jax.devices())"],
                       capture_output=True, text=True, timeout=120, env=cli_env())
    assert r.returncode == 0 and "cpu" in r.stdout.lower(), r
    assert not libtpu_noise(r.stderr), r.stderr


def test_platforms_and_compile_cache_defaults(tmp_path, monkeypatch):
    import importlib.util

    from cadenza import runtime_env

    monkeypatch.setattr(runtime_env, "tpu_chips_visible", lambda: False)
    if importlib.util.find_spec("libtpu") is not None:  # the tpu extra (make's default)
        assert runtime_env.default_platforms({}) in ("cpu", "cuda,cpu")
    else:  # nothing would print: JAX chooses
        assert runtime_env.default_platforms({}) is None
    assert runtime_env.default_platforms({"JAX_PLATFORMS": "tpu"}) is None
    monkeypatch.setattr(runtime_env, "tpu_chips_visible", lambda: True)
    assert runtime_env.default_platforms({}) is None
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert runtime_env.compile_cache_dir(None, env) == str(tmp_path / "cadenza" / "jax-compile")
    assert runtime_env.compile_cache_dir("off", env) is None
    assert runtime_env.compile_cache_dir(None, {"CADENZA_COMPILE_CACHE": "/x"}) == "/x"
    runtime_env.configure_cli("off", env, host_memory="release")
    assert "JAX_COMPILATION_CACHE_DIR" not in env
    runtime_env.configure_cli(None, env, host_memory="release")
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cadenza" / "jax-compile")
    env = {"TPU_WORKER_ID": "3"}
    monkeypatch.setattr(runtime_env, "tpu_chips_visible", lambda: False)
    runtime_env.quiet_libtpu_for_aot("v5p-8", env)
    assert env == {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8",
                   "TPU_WORKER_ID": "3", "TPU_WORKER_HOSTNAMES": "localhost"}


FAULTS_SCRIPT = """
import ctypes, resource, sys
from cadenza.runtime_env import keep_host_memory
if sys.argv[1] == "keep":
    assert keep_host_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(4):   # 64 MiB, written and freed: above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))
"""


def test_host_memory_choice_and_kept_blocks_stop_faulting(monkeypatch, cli_env):
    from cadenza import runtime_env
    from cadenza.errors import CadenzaError

    monkeypatch.setattr(runtime_env, "tpu_chips_visible", lambda: False)
    monkeypatch.setattr(runtime_env, "_nvidia_gpu_usable", lambda: False)
    assert runtime_env.host_memory_kept(None, {}) is True           # CPU-only: auto keeps
    assert runtime_env.host_memory_kept("release", {}) is False
    assert runtime_env.host_memory_kept(None, {"CADENZA_HOST_MEMORY": "release"}) is False
    assert runtime_env.host_memory_kept(None, {"JAX_PLATFORMS": "cuda,cpu"}) is False
    monkeypatch.setattr(runtime_env, "tpu_chips_visible", lambda: True)
    assert runtime_env.host_memory_kept(None, {}) is False
    assert runtime_env.host_memory_kept("keep", {}) is True
    with pytest.raises(CadenzaError, match="CADENZA_HOST_MEMORY"):
        runtime_env.host_memory_kept(None, {"CADENZA_HOST_MEMORY": "always"})
    faults = {}
    for mode in ("release", "keep"):
        r = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True,
                           text=True, timeout=120, env=cli_env())
        assert r.returncode == 0, r.stderr
        faults[mode] = int(r.stdout)
    assert faults["release"] > 10_000 and faults["keep"] < 1_000, faults
