"""A training run's settings as data: :class:`TrainConfig`, the one source of the CLI options.

Each field of :class:`TrainConfig` is one setting, with its default, its validator and its help:
:func:`build_parser` generates ``python -m lavae_fast.train``'s options from the fields (in field
order: ``args.json`` keeps it), config files (``--config FILE``) name the same fields, and a Python
user builds a ``TrainConfig(out=..., steps=...)`` that :meth:`TrainConfig.checked` validates with
the options' own validators (:class:`ConfigError` naming the setting), so that the CLI and the
library accept exactly the same values.

The fields marked ``run_defining`` define a run: a resume refuses a continuation that changes any
of them (:func:`lavae_fast.trainer.resume_refusal`); the rest (logging cadence, device, threads,
speed flags) may change between sessions. The data set directory (``data``) is compared by content,
its fingerprint stored in the checkpoint, not by the path that names it. The one table of defaults
for runs written before a setting existed or changed is :data:`ADDED_SETTINGS` and
:data:`LEGACY_DEFAULTS` below.

``args.json`` and the checkpoint's ``args`` are :meth:`TrainConfig.to_dict`: the keys and values the
argparse namespace had, in the same order, so run directories written before this class still
resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from . import _cli
from .data.registry import DATASETS, IMPORTED
from .schedules import LR

__all__ = ["TrainConfig", "ConfigError", "build_parser", "run_defining_fields", "read_config_file", "config_argv",
           "config_file_text", "CONFIG_DIR", "ConfigFileError", "resolved_settings", "ADDED_SETTINGS",
           "LEGACY_DEFAULTS"]


class ConfigError(ValueError):
    """A setting the trainer cannot run with; the message names the setting and what it takes.
    The CLI reports it as a usage error (exit code 2)."""


def _auto_or_length(positive: bool):
    """'auto' or a finite length in pixels (> 0 when ``positive``, else >= 0)."""
    need = "> 0" if positive else ">= 0"

    def parse(s):
        if s == "auto":
            return s
        try:
            v = float(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected 'auto' or a number {need}, got {s!r}") from None
        if not (math.isfinite(v) and (v > 0 if positive else v >= 0)):
            raise argparse.ArgumentTypeError(f"expected 'auto' or a number {need}, got {s!r}")
        return v

    return parse


def _setting(default, help: Optional[str] = None, *, run: bool = False, type=None, choices=None, kind: str = "value",
             metavar: Optional[str] = None, group: Optional[str] = None, required: bool = False):
    """A field of :class:`TrainConfig` and the CLI option that sets it. ``kind``: "value" (``--x V``),
    "flag" (``--x``: true), "switch" (``--x`` / ``--no-x``), "bf16" (``--bf16 [auto|on|off]`` and
    ``--no-bf16``); ``run``: the setting defines the run; ``group``: the help section."""
    cli = {"help": help, "type": type, "choices": choices, "kind": kind, "metavar": metavar, "group": group,
           "required": required}
    return field(default=default, metadata={"run_defining": run, "cli_option": cli})


_RECORDED = {"cli": False}  # metadata of the fields set by the trainer, not by an option
# The choices of --model: the kinds of lavae_fast.recipe.RECIPES when the parser is built.
_RECIPE_KINDS = "registered recipes"
SPEED = "speed (none of these changes what a step computes, bf16 aside)"
# Filled in where the help is printed (performance imports torch; this module stays light).
_BF16_SLOWDOWN = "{bf16_slowdown}"


@dataclass
class TrainConfig:
    """One training run's settings; ``python -m lavae_fast.train --help`` prints each one's help.

    Every field has its default, so ``TrainConfig(out="runs/x", steps=2000)`` is a complete config
    (``out`` is the one setting without one); :meth:`checked` validates the values."""

    model: str = _setting("lavae", "the model: LAVAE or the β-VAE baseline (a recipe registered by "
                                   "lavae_fast.recipe.register_recipe adds its kind)", run=True, choices=_RECIPE_KINDS)
    dataset: str = _setting("multi-dsprites", "a generated data set, or 'imported': a set made by `python -m "
                                              "lavae_fast.data import` (pass its directory as --data)", run=True,
                            choices=sorted(DATASETS) + [IMPORTED])
    data: Optional[str] = _setting(None, "data set directory (python -m lavae_fast.data generate); default: generate "
                                         "a small one in memory")
    canvas: Union[List[int], Tuple[int, int]] = _setting((64, 64), "N or HxW (in-memory data only)", run=True,
                                                         type=_cli.canvas)
    n_train: int = _setting(20000, "in-memory training images", run=True, type=_cli.positive_int)
    n_test: int = _setting(1000, "in-memory 0–3-object test images (0: none)", type=_cli.nonneg_int)
    n_test7: int = _setting(1000, "in-memory 7-object test images (0: none, e.g. on a canvas too small for 7)",
                            type=_cli.nonneg_int)
    n_val: int = _setting(500, "validation images (0–3 objects, generated in memory from the data's settings and a "
                               "stream of their own: held out from training and testing); at each --eval-every the "
                               "model is evaluated on them and the best so far (count accuracy, then -ELBO) is kept "
                               "as RUN_DIR/checkpoint.best.pt, the checkpoint to ship; 0: no validation",
                          type=_cli.nonneg_int)
    data_seed: int = _setting(0, run=True, type=_cli.nonneg_int)
    steps: int = _setting(100_000, "budget; 100000 = the paper's schedule", run=True, type=_cli.positive_int)
    batch_size: int = _setting(64, "global batch; under torchrun each of the N processes takes batch-size/N images",
                               run=True, type=_cli.batch_size)
    seed: int = _setting(0, run=True, type=_cli.nonneg_int)
    device: str = _setting("cpu")
    out: Optional[str] = _setting(None, "run directory (owned by one trainer at a time)", required=True)
    resume: bool = _setting(False, "continue from RUN_DIR/checkpoint.pt", kind="flag")
    overwrite: bool = _setting(False, "start afresh in a run directory that holds a run, deleting all of that run's "
                                      "files: checkpoints, metrics.jsonl, args.json, tb/, evaluation results and "
                                      "figures/ (all or nothing; without it such a directory is refused)", kind="flag")
    ops: str = _setting("fused", "the engine that computes the model's ops: the fused kernels (C++ / Triton) or the "
                                 "plain-PyTorch reference; chosen where the model runs (lavae_fast.ops.use_engine), "
                                 "not stored with it", choices=["fused", "reference"])
    location_mode: str = _setting(
        "relaxed", "training estimator of the locations (SPEC §3): the relaxed Gumbel-softmax samples place the "
                   "sprites (default, the paper's) or straight-through (hard in value, relaxed in gradient)",
        run=True, choices=["relaxed", "straight_through"])
    loc_kl: str = _setting(
        "relaxed", "location term log q in training (SPEC §3): log q at the relaxed sample (default), the exact log q "
                   "of the hard draws plus the straight-through gradient, or the exact log q with its own gradient "
                   "only (see lavae_fast.model.LAVAE)", run=True, choices=["relaxed", "straight_through", "hard"])
    count_window: int = _setting(
        3, "the counter's neighbourhood (odd): n̂ counts the points of h_loc above 4γ that are maxima of their N×N "
           "window (default 3, SPEC §2's 3×3; see lavae_fast.ops.count_objects)", run=True,
        type=_cli.odd_positive_int, metavar="N")
    exclusion_window: Optional[int] = _setting(
        None, "q's exclusion window (odd): each location draw removes its N×N neighbourhood from the later draws' "
              "candidates, in training, the bound and inference (default 5, measured better than the paper's 1 — "
              "only the drawn pixel — in docs/recipe.md, or the largest odd window the canvas holds where it cannot "
              "hold 5; SPEC §2; see lavae_fast.ops.gumbel_topk_relaxed)", run=True, type=_cli.odd_positive_int,
        metavar="N")
    width: int = _setting(44, "channels of LAVAE's residual nets", run=True, type=_cli.channels)
    sprite_width: int = _setting(48, run=True, type=_cli.channels)
    sprite_size: Optional[int] = _setting(
        None, "LAVAE's sprite side S in pixels (odd; default: the data set's: 17 multi-MNIST, 21 multi-dSprites, an "
              "imported set's from its import, given or suggested by `python -m lavae_fast.data stats`)", run=True,
        type=_cli.odd_positive_int, metavar="S")
    lr: float = _setting(LR, run=True, type=_cli.positive_float)
    loc_lr: Optional[float] = _setting(None, "location-net lr (default: 1e-4 MNIST, 5e-4 dSprites)", run=True,
                                       type=_cli.positive_float)
    loc_lr_decay: float = _setting(100.0, "total exponential decay of the location-net lr over the horizon (paper: "
                                          "100)", run=True, type=_cli.positive_float)
    warmup_scale: Union[str, float] = _setting(
        "auto", "multiplier of the aux VAE's KL map as h_loc's target: a number (1 = the raw map, nats per latent "
                "location) or 'auto' (peaks lifted to 2·4γ, see aux_vae.auto_target_scale)", run=True, type=_auto_or_length(True))
    warmup_peak: float = _setting(
        2.0, "height of the target's object peaks as a multiple of the threshold 4γ (with --warmup-target map: of the "
             "auto-scaled map's typical peak)", run=True, type=_cli.positive_float)
    warmup_blur: Union[str, float] = _setting(
        "auto", "σ in pixels of the Gaussian blur applied to the KL map before it becomes h_loc's target (0: none; "
                "'auto': sprite size / 7, see aux_vae.smooth_target)", run=True, type=_auto_or_length(False))
    warmup_target: str = _setting(
        "cones", "h_loc's warm-up target: 'cones' (default) one cone of height --warmup-peak·4γ at each point the "
                 "smoothed, scaled KL map counts (aux_vae.peak_target); 'map' that map itself", run=True,
        choices=["cones", "map"])
    warmup_anchor: str = _setting(
        "ink", "with --warmup-target cones: a cone stands at the map's peak, or at the ink centroid of the image in "
               "the sprite-sized window around it (aux_vae.ink_anchors)", run=True, choices=["ink", "map"])
    warmup_radius: Union[str, float] = _setting(
        "auto", "with --warmup-target cones: their radius in pixels ('auto': sprite size / 4)", run=True,
        type=_auto_or_length(True))
    warmup_weight: float = _setting(
        1.0, "multiplier of the warm-up loss, on top of its schedule (default 1, the paper's; ×300 was needed by "
             "straight-through only, see docs/recipe.md)", run=True, type=_cli.positive_float)
    log_every: int = _setting(50, type=_cli.positive_int)
    probe_gradients: bool = _setting(False, "at each log step, log how hard each loss term pushes on h_loc (hgrad_*; "
                                            "a few extra partial backward passes)", kind="flag")
    ckpt_every: int = _setting(500, type=_cli.positive_int)
    eval_every: int = _setting(1000, "0: never", type=_cli.nonneg_int)
    eval_size: int = _setting(256, "test images per split at --eval-every", type=_cli.positive_int)
    image_every: Optional[int] = _setting(None, "image grids (default: --eval-every)", type=_cli.nonneg_int)
    stop_at: Optional[int] = _setting(None, "stop after this step (as if interrupted)", type=_cli.positive_int)
    threads: Optional[int] = _setting(None, "torch threads (default: the CPUs this process may use)",
                                      type=_cli.positive_int)
    channels_last: bool = _setting(True, "channels-last memory format for the convolutions (default: on)",
                                   kind="switch", group=SPEED)
    fused_norm: bool = _setting(True, "each Leaky ReLU + batch norm as one fused op (lavae_fast.norm; default: on)",
                                kind="switch", group=SPEED)
    compile: bool = _setting(False, "torch.compile the convolutional nets (20-40 s of compilation at the first step)",
                             kind="switch", group=SPEED)
    bf16: str = _setting(
        "auto", "bf16 autocast for LAVAE's convolutions. auto (default): bf16 where the device computes it natively "
                "(a CPU with avx512_bf16 or amx_bf16, a CUDA GPU that supports it), float32 elsewhere; on (or a bare "
                "--bf16): always (where bf16 is emulated, e.g. an AVX2-only CPU, ~" + _BF16_SLOWDOWN + "x slower); "
                "off: float32. The choice is printed and recorded in args.json and the checkpoint; --resume keeps "
                "the recorded one", choices=["auto", "on", "off"], kind="bf16", group=SPEED)
    tune_allocator: bool = _setting(True, "keep freed activations in the process instead of unmapping them (glibc; "
                                          "see lavae_fast.performance)", kind="switch", group=SPEED)
    no_progress: bool = _setting(False, kind="flag")
    sync_bn: bool = _setting(False, "distributed GPU runs: batch norm over the global batch (SyncBatchNorm) in the "
                                    "inference nets and the aux VAE; refused on the CPU, where SyncBatchNorm does not "
                                    "run", kind="flag")
    dist_backend: str = _setting("auto", "torchrun runs: process-group backend (auto: nccl for --device cuda, gloo on "
                                         "the CPU)", choices=["auto", "gloo", "nccl"])
    # Set by the trainer once it has chosen the precision (recorded; --resume keeps it).
    precision: Optional[str] = field(default=None, metadata=_RECORDED)
    precision_reason: Optional[str] = field(default=None, metadata=_RECORDED)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        """The config of a parsed namespace (``build_parser().parse_args(...)``); an attribute
        without a field, or a field without a value, is an error."""
        values = vars(args)
        missing = [f for f in cls.cli_fields() if f not in values]
        if missing:
            raise TypeError(f"TrainConfig.from_args: the namespace lacks {', '.join(missing)}")
        return cls(**values)

    def to_dict(self) -> Dict[str, Any]:
        """The settings as a plain dict, in field order (``args.json``, the checkpoint's ``args``)."""
        return dataclasses.asdict(self)

    @classmethod
    def cli_fields(cls) -> Tuple[str, ...]:
        """The fields set by a command-line option (each is an option's ``dest``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("cli", True))

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "TrainConfig":
        """A checked config of settings by name (``batch_size`` or ``batch-size``; the others keep
        their defaults), as a config file gives them. Raises :class:`ConfigError`."""
        return cls._parse(config_argv(build_parser(), {k.replace("-", "_"): v for k, v in values.items()},
                                      "TrainConfig", error=ConfigError))

    def checked(self) -> "TrainConfig":
        """This config with every value validated and normalised as the CLI's options would be (a
        canvas ``64`` becomes ``(64, 64)``): a new config, or :class:`ConfigError` naming the first
        setting that is wrong. The recorded ``precision`` fields are kept as they are."""
        values = {k: v for k, v in self.to_dict().items() if k in self.cli_fields()}
        if values.get("out") is None:
            raise ConfigError("out: a run directory is required (TrainConfig(out=...), --out RUN_DIR)")
        checked = TrainConfig._parse(config_argv(build_parser(), values, "TrainConfig", error=ConfigError,
                                                 keep=("resume", "overwrite")))
        checked.precision, checked.precision_reason = self.precision, self.precision_reason
        return checked

    @classmethod
    def _parse(cls, argv: List[str]) -> "TrainConfig":
        return cls.from_args(build_parser(raising=True).parse_args(argv))


def run_defining_fields() -> Tuple[str, ...]:
    """The fields marked ``run_defining``, in field order."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("run_defining"))


class _RaisingParser(argparse.ArgumentParser):
    """A parser whose errors are :class:`ConfigError` (the library's), not a usage message and exit."""

    def error(self, message):
        # "argument --batch-size: ..." names the option; a Python user set the field batch_size.
        message = re.sub(r"argument --([a-z0-9-]+)", lambda m: f"{m.group(1).replace('-', '_')} (--{m.group(1)})",
                         message)
        raise ConfigError(message)


def build_parser(raising: bool = False) -> argparse.ArgumentParser:
    """``python -m lavae_fast.train``'s parser, one option per :class:`TrainConfig` field (in field
    order) plus ``--config``. ``raising``: errors raise :class:`ConfigError` instead of exiting."""
    from .performance import BF16_EMULATED_SLOWDOWN

    cls = _RaisingParser if raising else argparse.ArgumentParser
    p = cls(prog="python -m lavae_fast.train", description="Train LAVAE or the β-VAE baseline.")
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE_OR_NAME",
                   help="settings from a YAML file (one `option: value` line each, e.g. `batch_size: 16`), a run's "
                        "args.json, or the config that trained a shipped model by name (lavae-multi-dsprites, "
                        "lavae-multi-mnist-10k, lavae-multi-dsprites-64, baseline-multi-dsprites, "
                        "baseline-multi-mnist-10k: lavae_fast/configs/); options typed on the command line "
                        "override it")
    groups: Dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainConfig):
        cli = f.metadata.get("cli_option")
        if cli is None:
            continue
        where = p if cli["group"] is None else groups.setdefault(cli["group"], p.add_argument_group(cli["group"]))
        flag = "--" + f.name.replace("_", "-")
        help = cli["help"]
        if help is not None:
            help = help.replace(_BF16_SLOWDOWN, str(BF16_EMULATED_SLOWDOWN))
        kind = cli["kind"]
        if kind == "flag":
            where.add_argument(flag, action="store_true", help=help)
        elif kind == "switch":
            where.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        elif kind == "bf16":
            where.add_argument(flag, nargs="?", choices=cli["choices"], const="on", default=f.default, help=help)
            where.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const="off",
                               help=f"same as {flag} off")
        else:
            kw = {"required": True} if cli["required"] else {"default": f.default}
            if cli["type"] is not None:
                kw["type"] = cli["type"]
            if cli["choices"] == _RECIPE_KINDS:
                from .recipe import RECIPES

                kw["choices"] = list(RECIPES)
            elif cli["choices"] is not None:
                kw["choices"] = cli["choices"]
            if cli["metavar"] is not None:
                kw["metavar"] = cli["metavar"]
            where.add_argument(flag, help=help, **kw)
    _cli.accept_negative_numbers(p)
    return p


# Run settings whose default changed, with the value of the versions before the change: a run
# directory written then may lack the key, and is compared against the old value, not today's.
LEGACY_DEFAULTS = {"location_mode": "straight_through", "loc_kl": "straight_through"}
# Run settings added later whose default is what the versions before them did: a run directory
# written then lacks the key and is compared against that value (the counter was 3×3; the sprite
# side was the data set's, which None stands for).
ADDED_SETTINGS = {"count_window": 3, "exclusion_window": 1, "sprite_size": None}


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


class ConfigFileError(ConfigError):
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


def config_argv(parser: argparse.ArgumentParser, values: Dict[str, Any], where: str = "--config",
                error: type = None, keep: Sequence[str] = ()) -> List[str]:
    """The command-line tokens that set ``values`` (option dest → value) through ``parser``'s own
    options, so that a config file's values are parsed and checked exactly as typed options are
    (and options typed after them override them). Raises ``error`` (:class:`ConfigFileError` by
    default) for a key that is no option (with the closest names) or a value of the wrong kind for
    a flag. :data:`IGNORED_KEYS` are skipped, but for those in ``keep``."""
    fail = ConfigFileError if error is None else error
    actions: Dict[str, argparse.Action] = {}
    for a in parser._actions:  # the first option of each setting (--bf16, not --no-bf16)
        if a.option_strings and a.dest not in ("help", "config"):
            actions.setdefault(a.dest, a)
    argv: List[str] = []
    for key, value in values.items():
        if key in IGNORED_KEYS and key not in keep:
            continue
        action = actions.get(key)
        if action is None:
            close = difflib.get_close_matches(key, list(actions), n=3)
            raise fail(f"{where}: unknown setting {key!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                         else ""))
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise fail(f"{where}: {key} must be true or false, got {value!r}")
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true flags
            if not isinstance(value, bool):
                raise fail(f"{where}: {key} must be true or false, got {value!r}")
            if value != action.default:
                if action.const is not True:
                    raise fail(f"{where}: {key} cannot be set to {value!r} from a file")
                argv.append(flag)
        elif value is None:
            if action.default is not None:
                raise fail(f"{where}: {key} must have a value (null is not allowed for it)")
        else:
            if isinstance(value, (list, tuple)):  # the canvas: [H, W]
                value = "x".join(str(v) for v in value)
            elif isinstance(value, bool) or isinstance(value, (dict,)):
                raise fail(f"{where}: {key} takes a value like {action.default!r}, got {value!r}")
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
