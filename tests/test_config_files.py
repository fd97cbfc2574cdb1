"""Config files for training (issue 25, step 1): ``python -m lavae_fast.train --config FILE_OR_NAME``.

A config file's values go through the trainer's own options (parsed and checked as typed ones,
overridden by options typed after them); ``lavae_fast/configs/`` holds the settings that trained
each shipped model, which must equal the settings recorded in the model file key by key."""

import json
import os

import pytest

from lavae_fast.checkpoint import load_checkpoint
from lavae_fast.pretrained import model_file, shipped
from lavae_fast.train import ADDED_SETTINGS, LEGACY_DEFAULTS, RUN_DEFINING, build_parser, parse_with_config
from lavae_fast.train import main as train_main
from lavae_fast.train_config import CONFIG_DIR, MACHINE_KEYS, TrainConfig

from test_resilience import TINY  # noqa: E402


def _parse(argv):
    return TrainConfig.from_args(parse_with_config(build_parser(), argv)).to_dict()


@pytest.mark.parametrize("kind, name", sorted(shipped()))
def test_each_shipped_models_config_equals_its_recorded_settings(kind, name):
    recorded = load_checkpoint(model_file(kind, name))["args"]
    assert os.path.isfile(os.path.join(CONFIG_DIR, f"{kind}-{name}.yaml"))
    resolved = _parse(["--config", f"{kind}-{name}", "--out", "somewhere"])
    earlier = {**ADDED_SETTINGS, **LEGACY_DEFAULTS}
    for key in RUN_DEFINING:  # every setting that defines the run, as --resume resolves it
        assert resolved[key] == recorded.get(key, earlier.get(key)) or (
            key == "canvas" and list(resolved[key]) == list(recorded[key])), key
    options = {a.dest for a in build_parser()._actions if a.option_strings}
    for key, value in recorded.items():  # and every other recorded option, machine settings aside
        if key in options and key not in MACHINE_KEYS:
            assert resolved[key] == value or list(resolved[key]) == list(value), key


def _steps(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "sec_per_step"} for line in f]


def test_a_run_from_a_config_file_logs_what_the_same_command_line_logs(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("dataset: multi-dsprites\ncanvas: [32, 32]\nn_train: 64\nn-test: 16\nn_test7: 8\nbatch_size: 4\n"
                   "width: 6\nsprite_width: 36\nthreads: 1\nno_progress: true\nlog_every: 1\neval_every: 0\n"
                   "steps: 3\nbf16: 'off'\nchannels_last: false\n")
    a, b, c = (str(tmp_path / n) for n in ("from_file", "from_flags", "from_args_json"))
    assert train_main(["--config", str(cfg), "--out", a]) == 0
    assert train_main(TINY + ["--steps", "3", "--bf16", "off", "--no-channels-last", "--out", b]) == 0
    assert _steps(a) == _steps(b) and len(_steps(a)) == 3
    # A run's own args.json is a config file: the run again, elsewhere.
    assert train_main(["--config", os.path.join(a, "args.json"), "--out", c]) == 0
    assert _steps(c) == _steps(a)


def test_options_typed_after_the_config_override_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 7\nbatch-size: 5\ncompile: true\n")
    got = _parse(["--config", str(cfg), "--out", "x", "--steps", "9", "--no-compile"])
    assert (got["steps"], got["batch_size"], got["compile"]) == (9, 5, False)


@pytest.mark.parametrize("text, message", [
    ("batch_sise: 4\n", "unknown setting 'batch_sise' .did you mean batch_size"),
    ("steps: [1\n", "not valid YAML"),
    ("- steps\n", "must be a mapping"),
    ("compile: 3\n", "compile must be true or false"),
])
def test_a_bad_config_file_is_a_usage_error_naming_the_problem(tmp_path, capsys, text, message):
    import re

    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        _parse(["--config", str(cfg), "--out", "x"])
    assert e.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_a_config_value_is_checked_as_a_typed_option_is(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: -3\n")
    with pytest.raises(SystemExit):
        _parse(["--config", str(cfg), "--out", "x"])
    assert "argument --steps: must be a positive integer, got -3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--config", "no-such-config", "--out", "x"])
    assert "lavae-multi-dsprites" in capsys.readouterr().err  # the names it knows
