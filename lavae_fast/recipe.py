"""The paper's training recipe as a library object (SPEC §5, paper appendix B).

A plain training loop that only calls ``model(x).loss.backward()`` never learns to count: the
count threshold is taught by the warm-up target, n is forced to 1 early on, τ is annealed and the
location net has its own, decaying learning rate. :class:`Recipe` holds all of that for a step
budget, so that a loop of your own stays a few lines::

    recipe = Recipe(model, steps=20_000, dataset="multi-dsprites")
    opt = recipe.optimizer()
    for step in range(steps):
        x = ...                                   # [B, C, H, W] in {0, 1}
        ids = torch.arange(step * B, (step + 1) * B)  # the images' global sample indices
        recipe.step(opt, step)                    # this step's learning rates
        loss, logs = recipe.loss(x, step, ids)
        opt.zero_grad(); loss.backward(); opt.step()

(``examples/train_loop.py`` is that loop, complete.) ``Recipe(model, ...)`` returns the recipe of
the model's kind: :class:`LAVAERecipe` or :class:`BetaVAERecipe`, behind one interface, which is
all that :class:`lavae_fast.trainer.Trainer` knows of a model. A third kind of model trains by
subclassing :class:`Recipe` and :func:`register_recipe`-ing it under the name ``--model`` takes. Every random number of a step — the Gumbel
noise, z_app's noise, the forced-n coin, the aux VAE's noise — is a function of (seed, step,
sample id) (:mod:`lavae_fast.noise`), so a loop is reproducible and a data-parallel share of a batch
draws what the whole batch would. ``recipe.state_dict()`` holds the auxiliary VAE, the one piece of
state besides the model and the optimiser that a resumed loop needs; the schedules are pure
functions of (step, steps). The training CLI (:mod:`lavae_fast.train`) is built on this class.

The warm-up target's form and the defaults are decisions SPEC §5 leaves to us, each measured; see
:mod:`lavae_fast.aux_vae` and ``docs/recipe.md``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple, Type, Union

import numpy as np
import torch

from . import schedules
from ._common import check_int
from .aux_vae import (AUTO_PEAK, AuxVAE, auto_blur, auto_radius, auto_target_scale, peak_target, smooth_target,
                      warmup_loss)
from .baseline import BetaVAE
from .data.registry import DATASETS
from .data.generator import parse_canvas
from .model import THRESHOLD_IN_GAMMAS, LAVAE, _as_dtype, check_images, count_threshold, location_gamma
from .metrics import index_rows_cols, location_accuracy, peak_distances
from .noise import MAX_KEY, check_sample_ids, draw_noise, draw_normal

__all__ = ["Recipe", "LAVAERecipe", "BetaVAERecipe", "RECIPES", "register_recipe", "recipe_class", "LR",
           "probe_location_gradients", "image_grid"]

LR = schedules.LR  # Adamax, every parameter but the location net's (paper appendix B)
WARMUP_TARGETS = ("cones", "map")
WARMUP_ANCHORS = ("ink", "map")


def probe_location_gradients(out, terms: Dict[str, torch.Tensor], top: int = 5) -> Dict[str, float]:
    """How hard each term of the objective pushes on the location logits: for each named scalar
    term, the mean over images of the average |∂term/∂h_loc| over the image's ``top`` most-pushed
    pixels (``hgrad_<name>``). The count depends on h_loc's peaks, and the warm-up target can only
    shape them where its push is not drowned by the ELBO's (docs/recipe.md)."""
    res = {}
    for name, term in terms.items():
        (g,) = torch.autograd.grad(term, out.h_loc, retain_graph=True, allow_unused=True)
        if g is None:
            res[f"hgrad_{name}"] = 0.0
            continue
        flat = g.detach().abs().flatten(1)
        res[f"hgrad_{name}"] = flat.topk(min(top, flat.shape[1]), dim=1).values.mean().item()
    return res


def _masked_mean(v: torch.Tensor, mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Mean of ``v`` [B] over ``mask`` [B] (bool, on the CPU), as a tensor on ``v``'s device; None for
    an empty mask. The elements are picked with an index made on the CPU, so ``v``'s device is not
    waited for (``v[mask]`` would read the mask's count back from it)."""
    if not mask.any():
        return None
    return v.index_select(0, mask.nonzero().squeeze(1).to(v.device)).mean()


def _as_floats(log: Dict[str, object]) -> Dict[str, object]:
    """``log`` with its tensor values as Python floats, read in one host sync."""
    keys = [k for k, v in log.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return log
    device = log[keys[0]].device
    values = torch.stack([log[k].detach().to(device, torch.float64) for k in keys]).tolist()
    return {**log, **dict(zip(keys, values))}


def _check_step(step) -> int:
    """A training step as an int in [0, MAX_KEY] (it keys the noise and the schedules), or a
    TypeError/ValueError naming ``step``: an int or a 0-d integer tensor, never a float (1.5 or
    NaN would reach the schedules and the learning rates)."""
    return check_int(step, "step", minimum=0, maximum=MAX_KEY)


def _auto_or_number(name: str, value, positive: bool) -> Union[str, float]:
    if value == "auto":
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 'auto' or a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be 'auto' or a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def image_grid(x: torch.Tensor, lam: torch.Tensor, rows=None, cols=None, n=None, count: int = 8) -> torch.Tensor:
    """[3, 2H+2, count·(W+2)] grid: inputs on top, reconstructions below with the inferred
    locations marked by red crosses."""
    x, lam = x[:count].detach().float().cpu(), lam[:count].detach().float().cpu()
    if x.shape[1] == 1:
        x, lam = x.expand(-1, 3, -1, -1), lam.expand(-1, 3, -1, -1)
    lam = lam.clone()
    B, _, H, W = x.shape
    if rows is not None:
        for b in range(B):
            for i in range(int(n[b])):
                r, c = int(rows[b, i]), int(cols[b, i])
                for dr, dc in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < H and 0 <= cc < W:
                        lam[b, :, rr, cc] = torch.tensor([1.0, 0.0, 0.0])
    grid = torch.full((3, 2 * H + 2, B * (W + 2)), 0.5)
    for b in range(B):
        grid[:, 1 : H + 1, b * (W + 2) + 1 : b * (W + 2) + 1 + W] = x[b]
        grid[:, H + 2 : 2 * H + 2, b * (W + 2) + 1 : b * (W + 2) + 1 + W] = lam[b]
    return grid.clamp(0, 1)


# The recipe of each model kind (model_config["kind"], the trainer's --model), by name.
RECIPES: Dict[str, Type["Recipe"]] = {}


def register_recipe(cls: Type["Recipe"]) -> Type["Recipe"]:
    """Make ``cls`` (a :class:`Recipe` subclass with a ``kind`` and a ``model_class``) the recipe of
    its kind: the trainer, ``--model`` and ``Recipe(model)`` find it by that name, and its model class
    is built from checkpoints of that kind (:data:`lavae_fast.loading.MODEL_CLASSES`). Usable as a
    class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Recipe)) or not isinstance(getattr(cls, "kind", None), str) \
            or not cls.kind:
        raise TypeError(f"register_recipe takes a Recipe subclass with a kind, got {cls!r}")
    from .loading import MODEL_CLASSES

    RECIPES[cls.kind] = cls
    # The checkpoint's model_config names the kind: the trainer and the readers of a run build the
    # model's class from it (lavae_fast.loading).
    MODEL_CLASSES.setdefault(cls.kind, cls.model_class)
    return cls


def recipe_class(kind: str) -> Type["Recipe"]:
    """The recipe registered for model kind ``kind`` (ValueError naming the known kinds)."""
    if kind not in RECIPES:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(sorted(RECIPES))})")
    return RECIPES[kind]


class Recipe:
    """The paper's recipe for ``model`` over ``steps`` steps; every milestone scales with ``steps``
    (100k = the paper's schedule). ``Recipe(model, steps, ...)`` makes the recipe of the model's
    kind (:class:`LAVAERecipe` for a :class:`~lavae_fast.LAVAE`, :class:`BetaVAERecipe` for the
    β-VAE baseline).

    Args:
        model: the model to train (its parameters are grouped by :meth:`optimizer`).
        steps: the step budget the schedules are laid over.
        dataset: a name of :data:`lavae_fast.data.DATASETS`; sets the location net's learning rate
            when ``loc_lr`` is not given (1e-4 multi-MNIST, 5e-4 multi-dSprites). Default: by
            channels (1 → multi-MNIST's, 3 → multi-dSprites').
        seed: keys the noise of every step (with the step and the sample ids).
        lr: learning rate of everything but the location net (1e-3).
        loc_lr, loc_lr_decay: the location net's learning rate and its total exponential decay
            over the budget (the paper: ×100).
        warmup_weight: multiplier of the warm-up loss on top of its schedule (the paper: 1).
        warmup_target: "cones" (default) or "map"; warmup_anchor: "ink" (default) or "map";
        warmup_scale, warmup_peak, warmup_blur, warmup_radius: the target's form (see
            :mod:`lavae_fast.aux_vae`; "auto" where a default is derived from the sizes).
        aux: the auxiliary VAE (LAVAE only); default: a new :class:`~lavae_fast.aux_vae.AuxVAE` on
            the model's device.

    The location and warm-up arguments are checked for every kind and used by LAVAE's recipe only.

    What the trainer asks of a recipe (a subclass overrides what its model needs): the class
    attributes ``kind`` (its name) and ``model_class``; :meth:`prepare_config` (settings the kind
    refuses or derives), :meth:`model_config` and :meth:`build_aux` (what the trainer builds and
    checkpoints), :meth:`from_config`, :meth:`precision`, :meth:`forward_module`; per step
    :meth:`step` and :meth:`forward`; at log steps :meth:`log_metrics`, :meth:`log_constants` and
    :meth:`image_grid`; :meth:`state_dict` for what a resume needs besides model and optimiser.
    """

    kind: str = ""
    model_class: type = type(None)
    supports_bf16 = False  # whether the model has a bf16 path (LAVAE's convolutions)

    def __new__(cls, model=None, *args, **kwargs):
        if cls is Recipe:  # Recipe(model, ...): the recipe of the model's kind
            for recipe in RECIPES.values():
                if isinstance(model, recipe.model_class):
                    cls = recipe
                    break
            else:
                known = " or ".join(f"lavae_fast.{r.model_class.__name__}" for r in RECIPES.values())
                raise TypeError(f"model must be a {known}, got {type(model).__name__}")
        return super().__new__(cls)

    def __init__(self, model, steps: int, *, dataset: Optional[str] = None, seed: int = 0, lr: float = LR,
                 loc_lr: Optional[float] = None, loc_lr_decay: float = schedules.LOC_LR_DECAY,
                 warmup_weight: float = 1.0, warmup_target: str = "cones", warmup_anchor: str = "ink",
                 warmup_scale="auto", warmup_peak: float = AUTO_PEAK, warmup_blur="auto", warmup_radius="auto",
                 aux: Optional[AuxVAE] = None):
        if not isinstance(model, self.model_class):
            raise TypeError(f"model must be a lavae_fast.{self.model_class.__name__} for {type(self).__name__}, got "
                            f"{type(model).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if dataset is not None and dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}")
        if warmup_target not in WARMUP_TARGETS:
            raise ValueError(f"warmup_target must be one of {WARMUP_TARGETS}, got {warmup_target!r}")
        if warmup_anchor not in WARMUP_ANCHORS:
            raise ValueError(f"warmup_anchor must be one of {WARMUP_ANCHORS}, got {warmup_anchor!r}")
        for name, v in (("lr", lr), ("loc_lr_decay", loc_lr_decay), ("warmup_weight", warmup_weight),
                        ("warmup_peak", warmup_peak)) + ((("loc_lr", loc_lr),) if loc_lr is not None else ()):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        self.model = model
        self.steps = steps
        self.seed = check_int(seed, "seed", minimum=0, maximum=MAX_KEY)
        self.lr = float(lr)
        if loc_lr is None:
            if dataset is None:
                dataset = "multi-dsprites" if model.channels == 3 else "multi-mnist-10k"
            loc_lr = DATASETS[dataset].loc_lr
        self.loc_lr = float(loc_lr)
        self.loc_lr_decay = float(loc_lr_decay)
        self.warmup_weight = float(warmup_weight)
        self.warmup_target = warmup_target
        self.warmup_anchor = warmup_anchor
        self.warmup_scale = _auto_or_number("warmup_scale", warmup_scale, positive=True)
        self.warmup_peak = float(warmup_peak)
        self.warmup_blur = _auto_or_number("warmup_blur", warmup_blur, positive=False)
        self.warmup_radius = _auto_or_number("warmup_radius", warmup_radius, positive=True)
        self.aux = self._default_aux(model, aux)

    def _default_aux(self, model, aux):
        """The auxiliary model this recipe trains beside ``model`` (None: none)."""
        return None

    # ---- what the trainer builds from its config ---------------------------------------------

    @classmethod
    def prepare_config(cls, config, recorded: Callable[[str], Any]) -> None:
        """Check ``config`` (a :class:`~lavae_fast.train_config.TrainConfig`) for this kind and fill
        the settings it derives, in place; raise ``ValueError`` naming a setting it refuses.
        ``recorded(key)``: the value the run being resumed recorded (None if none). Called before
        the run folder is touched and again once the data fixed the canvas."""

    @classmethod
    def model_config(cls, config, channels: int) -> Dict[str, Any]:
        """The model's construction config (checkpointed as ``model_config``; ``kind`` names the
        class) of a :class:`~lavae_fast.train_config.TrainConfig`."""
        return {"kind": cls.kind, "channels": channels, "canvas": list(parse_canvas(config.canvas))}

    @classmethod
    def build_aux(cls, channels: int):
        """The auxiliary module the trainer builds, checkpoints (as ``aux``) and passes to
        :meth:`from_config`; None for none."""
        return None

    @classmethod
    def from_config(cls, model, config, aux=None) -> "Recipe":
        """The recipe of a :class:`~lavae_fast.train_config.TrainConfig` (or the namespace
        ``lavae_fast.train.build_parser()`` parses: the same attributes)."""
        return cls(model, config.steps, dataset=config.dataset, seed=config.seed, lr=config.lr)

    @classmethod
    def from_args(cls, model, args, aux=None) -> "Recipe":
        """:meth:`from_config` of the recipe of ``args.model``."""
        return recipe_class(args.model).from_config(model, args, aux=aux)

    @classmethod
    def precision(cls, request: str, native: bool, why: str) -> Tuple[str, str]:
        """``--bf16`` auto|on|off → ("bf16" or "float32", the reason to print), given whether the
        device computes bf16 natively and why (:func:`lavae_fast.performance.bf16_native`)."""
        if request not in ("auto", "on", "off"):
            raise ValueError(f"--bf16 must be auto, on or off, got {request!r}")
        if not cls.supports_bf16:
            return "float32", f"--model {cls.kind} has no bf16 path"
        if request == "on":
            return "bf16", "--bf16 on"
        if request == "off":
            return "float32", "--bf16 off"
        return ("bf16" if native else "float32"), f"--bf16 auto: {why}"

    @classmethod
    def forward_module(cls, model, config):
        """What runs the model in a one-process run: the model itself, or its ``torch.compile``d
        wrapper (same parameters) with ``--compile``."""
        return torch.compile(model) if config.compile else model

    # ---- optimisation -----------------------------------------------------------------------

    def parameter_groups(self) -> list:
        """Adamax groups (one, ``model``, unless the kind says otherwise)."""
        return [{"params": list(self.model.parameters()), "lr": self.lr, "name": "model"}]

    def optimizer(self) -> torch.optim.Optimizer:
        """Adamax over :meth:`parameter_groups` (paper appendix B)."""
        return torch.optim.Adamax(self.parameter_groups())

    def learning_rates(self, step: int) -> Dict[str, float]:
        """Each group's learning rate at ``step``: a pure function of (step, steps)."""
        _check_step(step)
        return {"model": self.lr}

    def step(self, opt: torch.optim.Optimizer, step: int) -> Dict[str, float]:
        """Set ``opt``'s learning rates for ``step`` (the location net's decay); call it before
        ``opt.step()``. Groups are matched by name (those of :meth:`optimizer`). Returns the rates."""
        groups = getattr(opt, "param_groups", None)
        if not isinstance(groups, (list, tuple)):
            raise TypeError(f"opt must be a torch.optim.Optimizer (an object with param_groups), e.g. "
                            f"recipe.optimizer(), got {type(opt).__name__}")
        rates = self.learning_rates(step)
        for g in opt.param_groups:
            if g.get("name") in rates:
                g["lr"] = rates[g["name"]]
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}

    # ---- the loss -----------------------------------------------------------------------------

    def loss(self, x: torch.Tensor, step: int, ids: torch.Tensor,
             counts: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, Optional[float]]]:
        """(scalar loss to minimise, dict of floats to log) of one batch at ``step``.

        x [B,C,H,W] in {0, 1} on the model's device (another floating dtype is cast to the model's);
        step an int ≥ 0; ids [B] the images' global sample indices, ints (e.g. ``step·B + j``: they
        key the noise); counts [B] the true object counts (integers), optional, only logged (count
        accuracy), never trained on. Each is checked, a TypeError/ValueError naming it."""
        loss, _, logs = self.forward(x, step, ids, counts)
        return loss, logs

    def forward(self, x: torch.Tensor, step: int, ids: torch.Tensor, counts: Optional[torch.Tensor] = None,
                *, forward=None, aux_forward=None, probe: bool = False, as_tensors: bool = False):
        """:meth:`loss` with the model's output: (loss, output, logs). ``forward`` / ``aux_forward``
        run the model and the aux VAE — their DistributedDataParallel wrappers in a distributed run,
        by default the modules themselves. ``probe`` (LAVAE only) also logs
        :func:`probe_location_gradients` of the reconstruction, the two KL terms and the weighted
        warm-up loss. ``as_tensors``: the logged values computed on the device stay there, as detached
        0-dim tensors, so that a step does not wait for the device to log (the training CLI sums them
        on the device and reads them at its log steps); otherwise they are Python floats, read in
        one host sync. Values known on the host (τ, the schedules, the target's scale, the probe's)
        are Python floats either way; a term with nothing to average (no empty image) is None."""
        model = self.model
        # The checks that read no values (the model reads them), and the model's dtype for the aux
        # VAE and the warm-up target too (the model casts the images itself).
        check_images(x, model.channels, model.canvas, "x", values=False)
        x = _as_dtype(x, next(model.parameters()).dtype)
        step = _check_step(step)
        ids = check_sample_ids(ids, "ids")
        if len(ids) != x.shape[0]:
            raise ValueError(f"ids must hold one per image: {x.shape[0]} images, got {len(ids)} ids")
        if counts is not None and not (isinstance(counts, torch.Tensor) and counts.shape == (x.shape[0],)
                                       and not counts.is_floating_point() and not counts.is_complex()
                                       and counts.dtype != torch.bool):
            what = (f"a tensor of dtype {counts.dtype} and shape {tuple(counts.shape)}"
                    if isinstance(counts, torch.Tensor) else type(counts).__name__)
            raise TypeError(f"counts must be None or an integer tensor [{x.shape[0]}] (one per image), got {what}")
        forward = model if forward is None else forward
        loss, out, log = self._forward(x, step, ids, counts, forward, aux_forward, probe)
        return loss, out, (log if as_tensors else _as_floats(log))

    def _forward(self, x, step, ids, counts, forward, aux_forward, probe):
        """(loss, output, logs as tensors or numbers) of checked inputs: the kind's own objective."""
        raise NotImplementedError

    # ---- what the trainer logs ----------------------------------------------------------------

    def log_metrics(self, out, centres, counts) -> Dict[str, Optional[float]]:
        """Metrics of a log step's batch beyond :meth:`forward`'s logs, from its output and the
        true object centres [B] (lists of (row, col)) and counts [B]; {} by default."""
        return {}

    def log_constants(self, num_pixels: int) -> Dict[str, float]:
        """Numbers logged at every log step that do not change with the step (LAVAE's threshold)."""
        return {}

    def image_grid(self, x: torch.Tensor, out) -> torch.Tensor:
        """The TensorBoard image of a batch: inputs over reconstructions (:func:`image_grid`)."""
        return image_grid(x, out.lam)

    # ---- state ----------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, object]:
        """What a resumed loop needs besides the model and the optimiser: the aux VAE's state."""
        return {"aux": None if self.aux is None else self.aux.state_dict()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Load what :meth:`state_dict` returned (of a recipe for the same kind of model). Raises a
        TypeError for a state that is not a dict and a ValueError naming the missing or unexpected
        keys, or an ``aux`` that does not fit this recipe (a LAVAE recipe's aux VAE state is a
        dict, a baseline recipe's is None)."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (Recipe.state_dict()), got {type(state).__name__}")
        want = set(self.state_dict())
        missing, unexpected = sorted(want - set(state)), sorted(set(state) - want)
        if missing or unexpected:
            raise ValueError(f"state does not fit Recipe.state_dict(): missing key(s) {missing}, unexpected key(s) "
                             f"{unexpected}")
        if self.aux is None:
            if state["aux"] is not None:
                raise ValueError(f"state['aux'] holds an aux VAE, but this recipe ({self.kind}) has none")
            return
        if not isinstance(state["aux"], dict):
            raise ValueError(f"state['aux'] must be the aux VAE's state dict (a LAVAE recipe's), got "
                             f"{type(state['aux']).__name__}")
        self.aux.load_state_dict(state["aux"])


@register_recipe
class LAVAERecipe(Recipe):
    """LAVAE's recipe (SPEC §5): the location net's own decaying learning rate, τ's schedule, n
    forced to 1 early on, and the warm-up of h_loc on the aux VAE's KL map."""

    kind = "lavae"
    model_class = LAVAE
    supports_bf16 = True

    def _default_aux(self, model, aux):
        if aux is None:
            aux = AuxVAE(model.channels).to(next(model.parameters()).device)
        return aux

    @classmethod
    def prepare_config(cls, config, recorded: Callable[[str], Any]) -> None:
        import inspect

        from .ops import check_exclusion, default_exclusion_window

        params = inspect.signature(LAVAE).parameters
        latent = params["latent_size"].default
        if config.sprite_width <= latent:  # its residual blocks carry the latent_size z_app channels
            raise ValueError(f"--sprite-width must exceed LAVAE's latent size {latent}, got {config.sprite_width}")
        if config.exclusion_window is None and config.resume:
            # A resumed run keeps its own window unless one is asked for: a run from before the
            # setting drew with 1 (the default since is 5, or what the canvas holds).
            config.exclusion_window = recorded("exclusion_window")
        M = params["max_objects"].default
        H, W = parse_canvas(config.canvas)
        if config.exclusion_window is None:  # the default: 5, or what this canvas holds (SPEC §2)
            config.exclusion_window = default_exclusion_window((H, W), M)
        # SPEC §2's H·W > (M − 1)·w², checked before the run directory is touched.
        check_exclusion(config.exclusion_window, (H, W), H * W, M, "--exclusion-window")

    @classmethod
    def model_config(cls, config, channels: int) -> Dict[str, Any]:
        S = DATASETS[config.dataset].sprite_size
        return {**super().model_config(config, channels), "sprite_size": S, "width": config.width,
                "sprite_width": config.sprite_width, "location_mode": config.location_mode,
                "loc_kl": config.loc_kl, "count_window": config.count_window,
                "exclusion_window": config.exclusion_window}

    @classmethod
    def build_aux(cls, channels: int):
        return AuxVAE(channels)

    @classmethod
    def from_config(cls, model, config, aux=None) -> "Recipe":
        return cls(model, config.steps, dataset=config.dataset, seed=config.seed, lr=config.lr, loc_lr=config.loc_lr,
                   loc_lr_decay=config.loc_lr_decay, warmup_weight=config.warmup_weight,
                   warmup_target=config.warmup_target, warmup_anchor=config.warmup_anchor,
                   warmup_scale=config.warmup_scale, warmup_peak=config.warmup_peak, warmup_blur=config.warmup_blur,
                   warmup_radius=config.warmup_radius, aux=aux)

    @classmethod
    def forward_module(cls, model, config):
        return model  # LAVAE compiles its nets itself (LAVAE.accelerate)

    def parameter_groups(self) -> list:
        """Adamax groups: the location inference net (loc residual net + head) with its own
        learning rate, the rest of the model, the aux VAE."""
        loc = self.model.location_parameters()
        loc_ids = {id(p) for p in loc}
        rest = [p for p in self.model.parameters() if id(p) not in loc_ids]
        return [
            {"params": loc, "lr": self.loc_lr, "name": "location"},
            {"params": rest, "lr": self.lr, "name": "model"},
            {"params": list(self.aux.parameters()), "lr": self.lr, "name": "aux"},
        ]

    def learning_rates(self, step: int) -> Dict[str, float]:
        step = _check_step(step)
        return {"model": self.lr,
                "location": self.loc_lr * schedules.loc_lr_factor(step, self.steps, self.loc_lr_decay),
                "aux": self.lr}

    def _forward(self, x, step, ids, counts, forward, aux_forward, probe):
        model = self.model
        device = x.device
        H, W = x.shape[-2:]
        D = H * W
        log = {}
        aux_forward = self.aux if aux_forward is None else aux_forward
        gamma = location_gamma(D)
        threshold = count_threshold(D)
        tau = schedules.tau(step, self.steps)
        p_force = schedules.force_n_prob(step, self.steps)
        w_warm = schedules.warmup_weight(step, self.steps)
        noise = draw_noise(self.seed, step, ids, num_pixels=D, max_objects=model.max_objects,
                           latent_size=model.latent_size,
                           aux_shape=AuxVAE.latent_shape(H, W) if w_warm > 0 else None, device=device)
        out = forward(x, noise=noise, tau=tau, force_n_prob=p_force)
        loss = out.loss
        has = None if counts is None else counts > 0  # on the CPU, as counts are
        counts_here = None if counts is None else counts.to(device)
        if w_warm > 0:
            aux_out = aux_forward(x, noise.aux_eps)
            target, scale = self.warmup_target_of(aux_out.target, x, gamma)
            wl = warmup_loss(out.h_loc, target)
            warm = self.warmup_weight * w_warm * wl
            loss = loss + aux_out.loss + warm
            log.update(aux_loss=aux_out.loss.detach(), warmup_loss=wl.detach(), warmup_term=warm.detach(),
                       target_scale=scale)
            if counts is not None:
                tmax = target.detach().flatten(1).max(1).values
                log.update(target_count_acc=(model.engine.count_objects(target, threshold, model.max_objects,
                                                                         model.count_window)
                                             == counts_here).float().mean(),
                           target_max_obj=_masked_mean(tmax, has), target_max_empty=_masked_mean(tmax, ~has))
        if probe:
            terms = {"recon": out.recon.mean(), "kl_loc": out.kl_loc.mean(), "kl_app": out.kl_app.mean()}
            if w_warm > 0:
                terms["warmup"] = warm
            log.update(probe_location_gradients(out, terms))
        n_hat = out.n_hat.detach()
        log.update(loss=out.neg_elbo.detach().mean(), recon=out.recon.detach().mean(),
                   kl_app=out.kl_app.detach().mean(), kl_n=out.kl_n.detach().mean(), kl_loc=out.kl_loc.detach().mean())
        if counts is not None:
            hmax = out.h_loc.detach().flatten(1).max(1).values
            log.update(count_acc=(n_hat == counts_here).float().mean(),
                       hloc_max_obj=_masked_mean(hmax, has), hloc_max_empty=_masked_mean(hmax, ~has))
        log.update(nhat0=(n_hat == 0).float().mean(), nhat_mean=n_hat.float().mean(),
                   tau=tau, force_n_prob=p_force, warmup_weight=w_warm, forced=out.forced.detach().float().mean())
        return loss, out, log

    def warmup_target_of(self, kl_map: torch.Tensor, x: torch.Tensor, gamma: float) -> Tuple[torch.Tensor, float]:
        """h_loc's warm-up target [B,1,H,W] from the aux VAE's KL map [B,1,H,W], and the map's scale."""
        S = self.model.sprite_size
        sigma = auto_blur(S) if self.warmup_blur == "auto" else self.warmup_blur
        target = smooth_target(kl_map, sigma)
        cones = self.warmup_target == "cones"
        # With cones the scaled map only detects the objects (its points above 4γ at the default
        # scale, half the typical object peak); warmup_peak sets the cones' height.
        scale = (auto_target_scale(target, gamma, AUTO_PEAK if cones else self.warmup_peak)
                 if self.warmup_scale == "auto" else self.warmup_scale)
        target = target * scale
        if cones:
            radius = auto_radius(S) if self.warmup_radius == "auto" else self.warmup_radius
            threshold = THRESHOLD_IN_GAMMAS * gamma
            target = peak_target(target, threshold, self.warmup_peak * threshold, radius,
                                 x=x if self.warmup_anchor == "ink" else None, half=S // 2)
        return target, scale

    def log_metrics(self, out, centres, counts) -> Dict[str, Optional[float]]:
        model = self.model
        rows, cols = index_rows_cols(model.locate(out.h_loc.detach(), out.n_hat), out.h_loc.shape[-1])
        m, t = location_accuracy(rows, cols, out.n_hat, centres, counts)
        d = peak_distances(out.h_loc, centres, counts, model.count_window)
        return {"loc_acc": m / t if t else None, "peak_dist_median": float(np.median(d)) if len(d) else None}

    def log_constants(self, num_pixels: int) -> Dict[str, float]:
        return {"threshold": count_threshold(num_pixels)}

    def image_grid(self, x: torch.Tensor, out) -> torch.Tensor:
        return image_grid(x, out.lam, out.rows, out.cols, out.n)


@register_recipe
class BetaVAERecipe(Recipe):
    """The β-VAE baseline's recipe (SPEC §6): one Adamax group, β annealed 0 → 1 over the budget."""

    kind = "baseline"
    model_class = BetaVAE

    @classmethod
    def prepare_config(cls, config, recorded: Callable[[str], Any]) -> None:
        config.exclusion_window = 1  # the baseline draws no locations; 1 is what runs before the setting record

    def _forward(self, x, step, ids, counts, forward, aux_forward, probe):
        H, W = x.shape[-2:]
        beta = schedules.beta(step, self.steps)
        eps = draw_normal(self.seed, step, ids, self.model.latent_shape(H, W), device=x.device)
        out = forward(x, eps=eps, beta=beta)
        log = {"loss": out.neg_elbo.detach().mean(), "recon": out.recon.detach().mean(), "kl": out.kl.detach().mean(),
               "beta": beta}
        return out.loss, out, log
