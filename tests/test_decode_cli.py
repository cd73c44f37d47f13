"""``cadenza generate`` on a model directory written by save_model."""

import json

import jax
import pytest

from cadenza.cli import main
from cadenza.config import load_config
from cadenza.decode import DecodeConfig, generate
from cadenza.models import Transformer, init_params, save_model

PROMPTS = [[1, 17, 42, 99, 5], [1, 300], [1, 7, 7, 7, 200, 201, 202, 31, 64]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = load_config(None, [], preset="tiny")
    params = init_params(config.model, jax.random.key(3))
    directory = save_model(tmp_path_factory.mktemp("model") / "m", config, params)
    return directory, config, params


def test_generate_json_with_prompt_ids(checkpoint, capsys):
    directory, config, params = checkpoint
    argv = ["generate", "--checkpoint", str(directory), "--json", "--max-new-tokens", "8",
            "--ignore-eos"]
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = generate(Transformer(config.model), params, PROMPTS,
                        DecodeConfig(max_new_tokens=8, ignore_eos=True))
    assert [r["token_ids"] for r in rows] == expected.token_ids
    assert all(len(r["token_ids"]) == 8 and "text" not in r for r in rows)
    assert all(r["stats"]["steps"] == 7 and r["finish_reason"] == "length" for r in rows)


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "hello"], "text prompts need a tokenizer"),
    (["--prompt-ids", "5,x"], "comma-separated"),
    (["--prompt-ids", "5", "--method", "sample", "--top-p", "1.5"], "decode.sampling.top_p"),
    (["--prompt-ids", "5", "--max-new-tokens", "0"], "decode.max_new_tokens"),
    (["--prompt-ids", "5", "--chat"], "--chat needs text prompts"),
    (["--prompt-ids", "5", "--proxy-expert", "x"], "both"),
])
def test_generate_user_errors_exit_2(checkpoint, capsys, extra, message):
    directory, _, _ = checkpoint
    assert main(["generate", "--checkpoint", str(directory)] + extra) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--draft", "x"], "--draft does not apply to --method greedy"),
    (["--temperature", "0.5"], "--temperature does not apply to --method greedy"),
    (["--method", "sample", "--sample"], "--sample does not apply to --method sample"),
    (["--top-p", "0.5"], "use --method sample"),
    (["--method", "lud", "--gamma", "3"], "--gamma does not apply to --method lud"),
    (["--stream", "--json"], "drop --stream or --json"),
])
def test_flags_the_method_does_not_use_are_refused(checkpoint, capsys, extra, message):
    """Each method takes the flags its registry entry declares; others exit 2 in one line."""
    directory, _, _ = checkpoint
    assert main(["generate", "--checkpoint", str(directory), "--prompt-ids", "5"] + extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_imports_no_training_or_checkpointing_libraries(checkpoint, cli_env):
    """Start-up: ``cadenza generate`` on a model directory imports neither orbax and
    tensorstore (params.safetensors) nor the training, data or plotting libraries."""
    import subprocess
    import sys

    heavy = ("orbax", "tensorstore", "optax", "grain", "tensorflow_datasets", "tensorflow",
             "matplotlib", "transformers", "torch")
    code = ("import sys; from cadenza.cli import main; "
            f"rc = main(['generate', '--checkpoint', {str(checkpoint[0])!r}, '--prompt-ids', "
            "'1,2', '--max-new-tokens', '2']); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
