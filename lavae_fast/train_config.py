"""The training CLI's settings as a dataclass (:class:`TrainConfig`).

The parser (:func:`lavae_fast.train.build_parser`) stays the one place for the options' spelling,
defaults and help; :class:`TrainConfig` holds the parsed values, one field per option (the option's
``dest``), in the parser's order, plus the two the trainer records after choosing the precision.
A test checks that the fields and the parser's options correspond one to one.

The fields marked ``run_defining`` define a run: ``--resume`` refuses a continuation that changes
any of them (:func:`lavae_fast.train.resume_refusal`); the rest (logging cadence, device, threads,
speed flags) may change between sessions. The data set directory (``data``) is compared by content,
its fingerprint stored in the checkpoint, not by the path that names it.

``args.json`` and the checkpoint's ``args`` are :meth:`TrainConfig.to_dict`: the keys and values the
argparse namespace had, in the same order, so run directories written before this class still
resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ["TrainConfig", "run_defining_fields", "read_config_file", "config_argv", "config_file_text", "CONFIG_DIR",
           "ConfigFileError", "resolved_settings"]

_RUN = {"run_defining": True}  # metadata of the fields that define a run
_RECORDED = {"cli": False}  # metadata of the fields set by the trainer, not by an option


@dataclass
class TrainConfig:
    """One training run's settings; see ``python -m lavae_fast.train --help`` for each option."""

    model: str = field(metadata=_RUN)
    dataset: str = field(metadata=_RUN)
    data: Optional[str]
    canvas: Union[List[int], Tuple[int, int]] = field(metadata=_RUN)
    n_train: int = field(metadata=_RUN)
    n_test: int
    n_test7: int
    n_val: int
    data_seed: int = field(metadata=_RUN)
    steps: int = field(metadata=_RUN)
    batch_size: int = field(metadata=_RUN)
    seed: int = field(metadata=_RUN)
    device: str
    out: str
    resume: bool
    overwrite: bool
    ops: str
    location_mode: str = field(metadata=_RUN)
    loc_kl: str = field(metadata=_RUN)
    count_window: int = field(metadata=_RUN)
    exclusion_window: Optional[int] = field(metadata=_RUN)
    width: int = field(metadata=_RUN)
    sprite_width: int = field(metadata=_RUN)
    lr: float = field(metadata=_RUN)
    loc_lr: Optional[float] = field(metadata=_RUN)
    loc_lr_decay: float = field(metadata=_RUN)
    warmup_scale: Union[str, float] = field(metadata=_RUN)
    warmup_peak: float = field(metadata=_RUN)
    warmup_blur: Union[str, float] = field(metadata=_RUN)
    warmup_target: str = field(metadata=_RUN)
    warmup_anchor: str = field(metadata=_RUN)
    warmup_radius: Union[str, float] = field(metadata=_RUN)
    warmup_weight: float = field(metadata=_RUN)
    log_every: int
    probe_gradients: bool
    ckpt_every: int
    eval_every: int
    eval_size: int
    image_every: Optional[int]
    stop_at: Optional[int]
    threads: Optional[int]
    channels_last: bool
    fused_norm: bool
    compile: bool
    bf16: str
    tune_allocator: bool
    no_progress: bool
    sync_bn: bool
    dist_backend: str
    # Set by the trainer once it has chosen the precision (recorded; --resume keeps it).
    precision: Optional[str] = field(default=None, metadata=_RECORDED)
    precision_reason: Optional[str] = field(default=None, metadata=_RECORDED)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The config of a parsed namespace (``build_parser().parse_args(...)``); an attribute
        without a field, or a field without a value, is an error."""
        return cls(**vars(args))

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a plain dict, in field order (``args.json``, the checkpoint's ``args``)."""
        return dataclasses.asdict(self)

    @classmethod
    def cli_fields(cls) -> Tuple[str, ...]:
        """The fields set by a command-line option (each is an option's ``dest``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True))


def run_defining_fields() -> Tuple[str, ...]:
    """The fields marked ``run_defining``, in field order."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("run_defining"))


# Run settings whose default changed, with the value of the versions before the change: a run
# directory written then may lack the key, and is compared against the old value, not today's.
LEGACY_DEFAULTS = {"location_mode": "straight_through", "loc_kl": "straight_through"}
# Run settings added later whose default is what the versions before them did: a run directory
# written then lacks the key and is compared against that value (the counter was 3×3).
ADDED_SETTINGS = {"count_window": 3, "exclusion_window": 1}


# ---------------------------------------------------------------------------------------------
# Config files: ``python -m lavae_fast.train --config FILE_OR_NAME [options]``
# ---------------------------------------------------------------------------------------------

# The config files that trained the shipped models (lavae_fast/configs/NAME.yaml), by NAME.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# Settings of one machine or one invocation: left out of a config file written from a run.
MACHINE_KEYS = ("out", "data", "device", "threads", "no_progress", "resume", "overwrite", "precision",
                "precision_reason")
# Settings a config file may carry but the trainer sets itself, or that belong to one machine or
# one invocation: read from args.json and ignored (so that `--config RUN/args.json` reruns a run).
IGNORED_KEYS = ("precision", "precision_reason", "resume", "overwrite")


class ConfigFileError(ValueError):
    """A config file that cannot be read or names a setting the trainer does not have."""


def read_config_file(path_or_name: str) -> Dict[str, Any]:
    """The settings of a YAML (or JSON: ``args.json`` of a run) config file, or of a shipped model's
    config by name (``lavae-multi-dsprites`` → ``lavae_fast/configs/lavae-multi-dsprites.yaml``): a
    mapping of option names (``batch_size`` or ``batch-size``) to values. Raises
    :class:`ConfigFileError` naming the file and the problem."""
    path = path_or_name
    if not os.path.exists(path) and os.sep not in path and not path.endswith((".yaml", ".yml", ".json")):
        path = os.path.join(CONFIG_DIR, f"{path_or_name}.yaml")
        if not os.path.isfile(path):
            names = sorted(n[:-5] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml")) if os.path.isdir(CONFIG_DIR) else []
            raise ConfigFileError(f"--config {path_or_name}: no such file, nor a shipped config (names: "
                                  f"{', '.join(names) or 'none'})")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"--config {path}: cannot be read ({exc})") from None
    try:
        if path.endswith(".json"):
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError: the parser's own message
        raise ConfigFileError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} "
                              f"({str(exc).splitlines()[0]})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ConfigFileError(f"--config {path}: must be a mapping of option names to values, got "
                              f"{type(values).__name__}")
    return {k.replace("-", "_"): v for k, v in values.items()}


def config_argv(parser: argparse.ArgumentParser, values: Dict[str, Any], where: str = "--config") -> List[str]:
    """The command-line tokens that set ``values`` (option dest → value) through ``parser``'s own
    options, so that a config file's values are parsed and checked exactly as typed options are
    (and options typed after them override them). Raises :class:`ConfigFileError` for a key that is
    no option (with the closest names) or a value of the wrong kind for a flag."""
    actions: Dict[str, argparse.Action] = {}
    for a in parser._actions:  # the first option of each setting (--bf16, not --no-bf16)
        if a.option_strings and a.dest not in ("help", "config"):
            actions.setdefault(a.dest, a)
    argv: List[str] = []
    for key, value in values.items():
        if key in IGNORED_KEYS:
            continue
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=3)
            raise ConfigFileError(f"{where}: unknown setting {key!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                         else ""))
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise ConfigFileError(f"{where}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true flags
            if not isinstance(value, bool):
                raise ConfigFileError(f"{where}: {key} must be true or false, got {value!r}")
            if value != action.default:
                if action.const is not True:
                    raise ConfigFileError(f"{where}: {key} cannot be set to {value!r} from a file")
                argv.append(flag)
        elif value is None:
            if action.default is not None:
                raise ConfigFileError(f"{where}: {key} must have a value (null is not allowed for it)")
        else:
            if isinstance(value, (list, tuple)):  # the canvas: [H, W]
                value = "x".join(str(v) for v in value)
            elif isinstance(value, bool) or isinstance(value, (dict,)):
                raise ConfigFileError(f"{where}: {key} takes a value like {action.default!r}, got {value!r}")
            argv += [flag, str(value)]
    return argv


def resolved_settings(recorded: Dict[str, Any], options) -> Dict[str, Any]:
    """A run's recorded settings (``args.json``, a checkpoint's ``args``) as a config file's: each
    setting added since the run was written gets the value the run used (as ``--resume`` resolves
    it: :data:`ADDED_SETTINGS`, :data:`LEGACY_DEFAULTS`), options
    that no longer exist and :data:`MACHINE_KEYS` are left out; ``options``: the trainer's option
    dests, in the order of the result's keys where the run did not record them."""
    earlier = {**ADDED_SETTINGS, **LEGACY_DEFAULTS}
    values = {k: v for k, v in recorded.items() if k in options and k not in MACHINE_KEYS}
    for k, v in earlier.items():
        values.setdefault(k, v)
    return values


def config_file_text(values: Dict[str, Any], header: str = "") -> str:
    """``values`` as a YAML config file (one ``key: value`` line each, in order), with a comment
    ``header``; read back by :func:`read_config_file`."""
    import yaml

    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    body = yaml.safe_dump({k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()},
                          sort_keys=False, default_flow_style=None)
    return "\n".join(lines) + ("\n" if lines else "") + body
