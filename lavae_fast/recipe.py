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

(``examples/train_loop.py`` is that loop, complete.) Every random number of a step — the Gumbel
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
from typing import Dict, Optional, Tuple, Union

import torch

from . import schedules
from ._common import check_int
from .aux_vae import (AUTO_PEAK, AuxVAE, auto_blur, auto_radius, auto_target_scale, peak_target, smooth_target,
                      warmup_loss)
from .baseline import BetaVAE
from .data.registry import DATASETS
from .model import THRESHOLD_IN_GAMMAS, LAVAE, _as_dtype, check_images, count_threshold, location_gamma
from .noise import MAX_KEY, check_sample_ids, draw_noise, draw_normal

__all__ = ["Recipe", "LR", "probe_location_gradients"]

LR = 1e-3  # Adamax, every parameter but the location net's (paper appendix B)
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


class Recipe:
    """The paper's recipe for ``model`` (a :class:`~lavae_fast.LAVAE` or the β-VAE baseline) over
    ``steps`` steps; every milestone scales with ``steps`` (100k = the paper's schedule).

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
    """

    def __init__(self, model, steps: int, *, dataset: Optional[str] = None, seed: int = 0, lr: float = LR,
                 loc_lr: Optional[float] = None, loc_lr_decay: float = schedules.LOC_LR_DECAY,
                 warmup_weight: float = 1.0, warmup_target: str = "cones", warmup_anchor: str = "ink",
                 warmup_scale="auto", warmup_peak: float = AUTO_PEAK, warmup_blur="auto", warmup_radius="auto",
                 aux: Optional[AuxVAE] = None):
        if isinstance(model, LAVAE):
            self.kind = "lavae"
        elif isinstance(model, BetaVAE):
            self.kind = "baseline"
        else:
            raise TypeError(f"model must be a lavae_fast.LAVAE or lavae_fast.BetaVAE, got {type(model).__name__}")
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
        if self.kind == "lavae" and aux is None:
            device = next(model.parameters()).device
            aux = AuxVAE(model.channels).to(device)
        self.aux = aux if self.kind == "lavae" else None

    @classmethod
    def from_args(cls, model, args, aux: Optional[AuxVAE] = None) -> "Recipe":
        """The recipe of the training CLI's settings: a :class:`lavae_fast.train_config.TrainConfig`, or
        the namespace :func:`lavae_fast.train.build_parser` parses (the same attributes)."""
        if args.model == "baseline":
            return cls(model, args.steps, dataset=args.dataset, seed=args.seed, lr=args.lr)
        return cls(model, args.steps, dataset=args.dataset, seed=args.seed, lr=args.lr, loc_lr=args.loc_lr,
                   loc_lr_decay=args.loc_lr_decay, warmup_weight=args.warmup_weight,
                   warmup_target=args.warmup_target, warmup_anchor=args.warmup_anchor,
                   warmup_scale=args.warmup_scale, warmup_peak=args.warmup_peak, warmup_blur=args.warmup_blur,
                   warmup_radius=args.warmup_radius, aux=aux)

    # ---- optimisation -----------------------------------------------------------------------

    def parameter_groups(self) -> list:
        """Adamax groups: the location inference net (loc residual net + head) with its own
        learning rate, the rest of the model, the aux VAE (LAVAE); one group for the baseline."""
        if self.kind == "baseline":
            return [{"params": list(self.model.parameters()), "lr": self.lr, "name": "model"}]
        loc = self.model.location_parameters()
        loc_ids = {id(p) for p in loc}
        rest = [p for p in self.model.parameters() if id(p) not in loc_ids]
        return [
            {"params": loc, "lr": self.loc_lr, "name": "location"},
            {"params": rest, "lr": self.lr, "name": "model"},
            {"params": list(self.aux.parameters()), "lr": self.lr, "name": "aux"},
        ]

    def optimizer(self) -> torch.optim.Optimizer:
        """Adamax over :meth:`parameter_groups` (paper appendix B)."""
        return torch.optim.Adamax(self.parameter_groups())

    def learning_rates(self, step: int) -> Dict[str, float]:
        """Each group's learning rate at ``step``: a pure function of (step, steps)."""
        step = _check_step(step)
        rates = {"model": self.lr}
        if self.kind == "lavae":
            rates["location"] = self.loc_lr * schedules.loc_lr_factor(step, self.steps, self.loc_lr_decay)
            rates["aux"] = self.lr
        return rates

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
        device = x.device
        H, W = x.shape[-2:]
        D = H * W
        log = {}
        if self.kind == "baseline":
            beta = schedules.beta(step, self.steps)
            eps = draw_normal(self.seed, step, ids, model.latent_shape(H, W), device=device)
            out = forward(x, eps=eps, beta=beta)
            log.update(loss=out.neg_elbo.detach().mean(), recon=out.recon.detach().mean(),
                       kl=out.kl.detach().mean(), beta=beta)
            return out.loss, out, (log if as_tensors else _as_floats(log))

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
        return loss, out, (log if as_tensors else _as_floats(log))

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
                raise ValueError("state['aux'] holds an aux VAE, but this recipe (β-VAE baseline) has none")
            return
        if not isinstance(state["aux"], dict):
            raise ValueError(f"state['aux'] must be the aux VAE's state dict (a LAVAE recipe's), got "
                             f"{type(state['aux']).__name__}")
        self.aux.load_state_dict(state["aux"])
