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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = ["TrainConfig", "run_defining_fields"]

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
