"""LAVAE, the Location-Appearance VAE (SPEC §1–4, paper appendix B), as a plain ``nn.Module``.

Usable as a drop-in in a user's own training loop::

    model = LAVAE(channels=3, canvas=(64, 64), sprite_size=21)
    out = model(x, tau=0.5)            # x [B,3,64,64] in [0,1]
    out.loss.backward()                # mean −ELBO over the batch, nats per image

The four engine steps (placement + likelihood, Gumbel-top-k, counting, appearance gather) go
through :mod:`lavae_fast.ops` (``ops="fused"``, the registered operators with their C++/Triton
kernels) or :mod:`lavae_fast.reference` (``ops="reference"``, plain PyTorch), chosen through
:func:`lavae_fast.ops.engine`; both have the same signatures, so tests and benchmarks can compare
them. No op draws random numbers: the noise comes from :mod:`lavae_fast.noise` (keyed by seed, step
and sample) or, when not given, from torch's global RNG.

Architecture (widths are our choice; the paper gives only "~500k parameters split almost evenly
among location inference, appearance inference and sprite generation"). With the defaults
(width 44, sprite width 48) the three parts have ≈176k / 166k / 168k parameters at C = 3:

* two independent residual nets, 4 blocks × 2 convs 3×3, full resolution; a stem conv maps the C
  input channels to the width (the paper's blocks need an input of their own width);
* appearance head: conv 3×3 → 2L channels (μ and log σ² of z_app at every pixel), initialised
  near zero so that q(z_app) starts at the prior (see ``APP_HEAD_INIT_SCALE``);
* location head: 3 conv layers (3×3, last → 1 channel), times γ = ½·ln D;
* sprite decoder, see :class:`SpriteDecoder`;
* learned prior p(n) = softmax of M+1 logits.

Every convolution is followed by Leaky ReLU then batch norm (the paper's order), except the output
layers (heads and the sprite decoder's last conv) and the sprite decoder's last residual block.

The class is written in three modules: this one (construction, configuration, the encoder's
pieces and the −ELBO with its parts), :mod:`.inference` (a scene's latents: :meth:`LAVAE.infer`,
:meth:`LAVAE.decode`, :meth:`LAVAE.sample`, the edits) and :mod:`.bound` (the importance-sampled
:meth:`LAVAE.log_likelihood`), mixed into :class:`LAVAE`. The layers are :mod:`.layers`', the input
checks :mod:`.inputs`', the latents and the numbers of SPEC §1–2 :mod:`.scene`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..engine import ops as _ops_api
from ..engine._common import MIN_TAU, check_device, check_real, check_tau
from ..engine.noise import Noise, gumbel_from_uniform
from .bound import ImportanceBoundMixin
from .inference import InferenceMixin
from .inputs import as_dtype, check_canvas, check_images, check_size
from .layers import ConvAct, EvalMode, HeadConv2d, ResidualNet, SpriteDecoder, gaussian_kl, use_fused_norm
from .scene import EPS_LAMBDA, THRESHOLD_IN_GAMMAS, Latents, location_gamma

# What lavae_fast.model (this module's old path) defined and this module does not use, kept under
# the old names: recipe.py imports count_threshold and _as_dtype from there, train.py count_threshold.
from .layers import LEAK, ResBlock  # noqa: F401
from .scene import count_threshold  # noqa: F401

_as_dtype, _check_canvas, _check_size, _EvalMode = as_dtype, check_canvas, check_size, EvalMode

__all__ = ["LAVAE", "LAVAEOutput", "Latents", "SpeedConfig", "SpriteDecoder", "ResidualNet", "use_fused_norm", "check_images", "gaussian_kl",
           "MIN_TAU"]

# MIN_TAU (imported above from lavae_fast.engine._common, where gumbel_topk_relaxed reads it too): the
# smallest τ the forward accepts; below it the relaxed sample is one-hot to float32 precision.
# A sprite larger than this is not an object of a scene (the paper's are 17 and 21 px): the decoder
# holds width·S² activations per present object and layer (48·127² floats ≈ 3 MB), so a typo'd
# size would otherwise try to allocate gigabytes before anything says why.
MAX_SPRITE_SIZE = 127
# The appearance head's initial weights are PyTorch's default times this (see LAVAE.__init__).
APP_HEAD_INIT_SCALE = 1e-2
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedConfig:
    """The fast paths switched on by :meth:`LAVAE.accelerate` (all off: plain eager float32)."""

    channels_last: bool = False
    fused_norm: bool = False
    compile: bool = False
    bf16: bool = False
    compile_mode: Optional[str] = None


@dataclass
class LAVAEOutput:
    """Result of :meth:`LAVAE.forward`. Per-image quantities are in nats, summed over pixels.

    loss: scalar, mean −ELBO over the batch.
    neg_elbo, recon, kl_app, kl_n, kl_loc: [B]; neg_elbo = recon + kl_app + kl_n + kl_loc with
        recon = −log p(x|z), kl_app = Σ_i KL(q(z_app^i)‖N(0,I)), kl_n = −log p(n),
        kl_loc = Σ_i [log q(z_loc^i) − log p(z_loc^i)].
    n_hat: [B] int64 inferred count; n: [B] the count used (n_hat unless forced to 1); forced: [B] bool.
    index: [B,M] int64 flat pixel of each drawn location (−1 for absent slots); rows, cols: [B,M].
    z_app, mu, logvar: [B,M,L] (zero rows for absent slots).
    lam: [B,C,H,W] Bernoulli means of the reconstruction. sprites: [B,M,C,S,S].
    h_loc: [B,1,H,W] γ-scaled location logits (with gradient: the warm-up loss uses it).
    gamma: the logit scale ½·ln D; threshold = 4γ.
    """

    loss: Tensor
    neg_elbo: Tensor
    recon: Tensor
    kl_app: Tensor
    kl_n: Tensor
    kl_loc: Tensor
    n_hat: Tensor
    n: Tensor
    forced: Tensor
    index: Tensor
    rows: Tensor
    cols: Tensor
    z_app: Tensor
    mu: Tensor
    logvar: Tensor
    lam: Tensor
    sprites: Tensor
    h_loc: Tensor
    gamma: float

    @property
    def threshold(self) -> float:
        return THRESHOLD_IN_GAMMAS * self.gamma



# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LAVAE(InferenceMixin, ImportanceBoundMixin, nn.Module):
    """Location-Appearance VAE.

    Args:
        channels: C (1 for multi-MNIST, 3 for multi-dSprites).
        canvas: (H, W) accepted by the entry points; None accepts any size (γ follows D = H·W).
        sprite_size: S, odd (17 for MNIST, 21 for dSprites).
        max_objects: M (10). latent_size: L (32).
        width: channels of the two full-resolution residual nets and the location head.
        sprite_width: channels of the sprite decoder's residual blocks (includes the L z_app ones).
        ops: None (default): the engine in use where the model runs (:func:`lavae_fast.ops.use_engine`,
            "fused" unless a caller says otherwise; not model state, so no checkpoint pins it); or
            "fused" (lavae_fast.ops) / "reference" (lavae_fast.reference) to pin this model's.
        location_mode: "relaxed" (default, the paper's estimator: in training the relaxed
            Gumbel-softmax samples place the sprites and read the appearance) or
            "straight_through" (hard in value, relaxed in gradient) — SPEC §3. Hard draws are
            used everywhere else (the bound, inference, figures, counting).
        loc_kl: the location term log q in training (SPEC §3; see :attr:`LOC_KL_CHOICES`):
            "relaxed" (default) log q at the relaxed sample, Σ_i ⟨r_i, log b^(i)⟩;
            "straight_through" the exact log q of the hard draws plus the relaxed sample's
            straight-through gradient; "hard" the exact log q of the hard draws with only its own
            (score-function-free) gradient. Evaluation always uses the exact log q of hard draws.
        count_window: the counter's neighbourhood, an odd int ≥ 1: n̂ counts the points of h_loc
            above 4γ that are maxima of their count_window × count_window neighbourhood
            (:func:`lavae_fast.ops.count_objects`). Default 3, SPEC §2's 3×3; changeable after
            loading (:meth:`set_count_window` or ``model.count_window = 5``).
        exclusion_window: q's exclusion window, an odd int ≥ 1 (SPEC §2): each location draw
            removes its exclusion_window × exclusion_window neighbourhood from the later draws'
            candidates, in training, the bound and ``infer(locations="top")``. 1 is the paper's
            eq. 11 (only the drawn pixel). Default (None): 5, measured better (docs/recipe.md: side
            by side at 64×64, two seeds, the −ELBO about 3× lower at the same count accuracy), or
            the largest odd window the canvas holds where it cannot hold 5 (H·W > (M − 1)·w²: a
            12×12 canvas with M = 10 gets 3, 8×8 gets 1); the chosen int is recorded. A window
            given explicitly is never reduced: one the canvas cannot hold is refused. A
            checkpoint written before the setting loads as 1. Changeable after loading
            (:meth:`set_exclusion_window`).
    """

    # Measured (bench/estimators.py's second table, exact ∂E_q[log q]/∂h by enumeration): "hard"
    # has mean zero over the draws (E_q[∂ log q] = 0), so it drops the KL's gradient altogether
    # (relerr ≈ 1); "straight_through" and "relaxed" are unbiased for one object (relerr within
    # the Monte Carlo error) and aligned but ~0.35 off for two (the jump of the second step, whose
    # relaxed sample is masked by the hard first draw). On the location net (32×32 multi-dSprites,
    # init, relaxed mode, B = 8, 8 draws) the two are nearly the same vector (cosine of their means
    # 0.97 at τ = 0.5, 1.00 at τ = 0.05; "hard": 0.53, 0.35), of size ~0.3% of the reconstruction's
    # (|∂/∂θ_loc| 1.4e2–1.8e2 against 4e4–1.2e5). In 60-step runs (same setting, --probe-gradients)
    # the three gave the same −ELBO to 1% and a top-5 push on h_loc of 0.03–0.05, against the
    # reconstruction's 0.6–5.6 and the ×300 warm-up's ~10³. For relaxed mode: "relaxed" (the whole
    # objective one function of the relaxed sample; its value → the exact log q as τ → 0) or
    # "straight_through", indistinguishable here; never "hard". Default: "relaxed", with
    # location_mode="relaxed" — the whole training objective is then one function of the relaxed
    # sample, the objective whose gradient the relaxed estimator is.
    # Why relaxed mode is the default (SPEC §3; 1500-step side-by-side runs, multi-dSprites 48×48,
    # B = 16, width 32, seed 0, same recipe otherwise, 300 test images per split): relaxed counted
    # 0.76 of the 0–3 test images right at the end (0.28 of the 7-object ones, location accuracy
    # 0.56, test −ELBO 874) against straight-through's 0.69 (0.23, 0.55, 900), ahead at every
    # evaluation from step 250 on; straight-through's push on h_loc was 190–480 per pixel against
    # relaxed mode's 2 (the 1/ε slope at uncovered ink, SPEC §3).
    LOC_KL_CHOICES = ("straight_through", "relaxed", "hard")

    def __init__(
        self,
        channels: int = 1,
        canvas: Optional[Sequence[int]] = (64, 64),
        sprite_size: int = 17,
        *,
        max_objects: int = 10,
        latent_size: int = 32,
        width: int = 44,
        sprite_width: int = 48,
        ops: Optional[str] = None,
        location_mode: str = "relaxed",
        loc_kl: str = "relaxed",
        count_window: int = 3,
        exclusion_window: Optional[int] = None,
    ):
        super().__init__()
        from ..engine.ops import MAX_OBJECTS

        channels = check_size("channels", channels)
        sprite_size = check_size("sprite_size", sprite_size)
        max_objects = check_size("max_objects", max_objects, 1, MAX_OBJECTS)
        latent_size = check_size("latent_size", latent_size)
        width = check_size("width", width)
        sprite_width = check_size("sprite_width", sprite_width)
        if sprite_size % 2 == 0:
            raise ValueError(f"sprite_size must be odd and positive (the centre pixel lands on the location), got {sprite_size}")
        canvas = check_canvas(canvas)
        if sprite_size > MAX_SPRITE_SIZE:
            raise ValueError(f"sprite_size must be <= {MAX_SPRITE_SIZE} (lavae_fast.model.MAX_SPRITE_SIZE), "
                             f"got {sprite_size}")
        self.channels = channels
        self.canvas = canvas
        self.sprite_size = sprite_size
        self.max_objects = max_objects
        self.latent_size = latent_size
        self.set_ops(ops)
        self.set_location_mode(location_mode)
        self.set_loc_kl(loc_kl)
        self.set_count_window(count_window)
        if exclusion_window is None:
            exclusion_window = _ops_api.default_exclusion_window(canvas, max_objects)
        self.set_exclusion_window(exclusion_window)
        if canvas is not None:
            self._draw_window(*canvas)  # a window this canvas cannot hold: refused now, not at the first draw

        self.app_net = ResidualNet(channels, width)
        self.app_head = HeadConv2d(width, 2 * latent_size, 3, padding=1)
        # Start q(z_app) at the prior: μ ≈ 0 and log σ² ≈ 0 at every pixel, so KL ≈ 0 at step 1.
        # With PyTorch's default init the head read features of the batch-normed residual net whose
        # rare-firing channels normalise to |h| ~ 10–20 on sparse binary images, and its outputs
        # reached log σ² ∈ [−17, 20], μ ∈ [−20, 23]: KL_app 5.3e3 nats per image at step 1 (48×48
        # multi-dSprites, B = 16, seed 0; up to 2e8 nats at one pixel; at 64×64 log σ² reached ±26
        # and KL_app 7.4e5 per image, 5.2e6 at most), a term that swamped the ELBO's first steps.
        # Now: 0.014 (48×48) and 0.045 (64×64) nats per image. Scaling the weights (not zeroing them) keeps a gradient into app_net
        # from the first step; the bias starts at 0 (the prior's μ = 0, log σ² = 0).
        with torch.no_grad():
            self.app_head.weight.mul_(APP_HEAD_INIT_SCALE)
            self.app_head.bias.zero_()
        self.loc_net = ResidualNet(channels, width)
        self.loc_head = nn.Sequential(ConvAct(width, width), ConvAct(width, width), HeadConv2d(width, 1, 3, padding=1))
        self.sprite_decoder = SpriteDecoder(latent_size, channels, sprite_size, sprite_width)
        self.prior_logits = nn.Parameter(torch.zeros(max_objects + 1))
        self._speed = SpeedConfig()
        self._compiled = {}  # name -> torch.compile'd callable (rebuilt on demand, never saved)

    @classmethod
    def from_pretrained(cls, name_or_path, *, canvas: Union[None, int, Sequence[int]] = None,
                        device="cpu", count_window: Optional[int] = None,
                        exclusion_window: Optional[int] = None) -> "LAVAE":
        """A trained LAVAE in eval mode.

        ``name_or_path``: a shipped model's name ("multi-dsprites", "multi-mnist-10k"; see
        ``python -m lavae_fast.pretrained list``), a run directory written by ``lavae_fast.train``,
        or a checkpoint file. ``canvas``: (H, W) or N to run the model on another canvas size (it is
        fully convolutional); default: the canvas it was trained on. ``count_window``: the counter's
        neighbourhood (see the class); default: the checkpoint's own (3 for one that does not say).
        ``exclusion_window``: q's exclusion window (see the class); default: the checkpoint's own (1
        for one that does not say).

        Only tensors and plain data are read (no arbitrary pickled objects) and the checkpoint's
        digest is verified. Raises ValueError for an unknown name,
        :class:`lavae_fast.pretrained.NotShipped` (a FileNotFoundError) for a name not shipped in
        this version, FileNotFoundError for a missing path, and
        :class:`lavae_fast.runtime.checkpoint.CheckpointError` (a ValueError) for a damaged file or a
        checkpoint of the β-VAE baseline.
        """
        from ..hub.reader import read_model_checkpoint, restore_model

        device = check_device(device)  # before reading: a device this process lacks fails at once
        state, path = read_model_checkpoint(name_or_path, "lavae")
        model = restore_model(cls, state, path, canvas=canvas, device=device)
        if count_window is not None:
            model.set_count_window(count_window)
        if exclusion_window is not None:
            model.set_exclusion_window(exclusion_window)
        return model

    # -- configuration ---------------------------------------------------------------------

    def set_ops(self, ops: Optional[str]) -> None:
        """Pin the engine: "fused" (lavae_fast.ops) or "reference" (lavae_fast.reference), see
        :func:`lavae_fast.ops.engine`; None (the default): the engine in use where the model runs
        (:func:`lavae_fast.ops.use_engine`, "fused" unless said otherwise)."""
        self._ops = None if ops is None else _ops_api.engine(ops)
        self.ops_name = ops

    @property
    def engine(self):
        """The namespace of engine ops this model runs now (its own, or :func:`lavae_fast.ops.use_engine`'s):
        for code that calls an op the way the model does, e.g. ``count_objects``."""
        return self._ops if self._ops is not None else _ops_api.engine(_ops_api.current_engine())

    def set_location_mode(self, mode: str) -> None:
        if mode not in ("straight_through", "relaxed"):
            raise ValueError(f"location_mode must be 'straight_through' or 'relaxed', got {mode!r}")
        self.location_mode = mode

    def set_loc_kl(self, loc_kl: str) -> None:
        """Pick the location term log q used in training (see the class docstring, SPEC §3)."""
        if loc_kl not in self.LOC_KL_CHOICES:
            raise ValueError(f"loc_kl must be one of {', '.join(map(repr, self.LOC_KL_CHOICES))}, got {loc_kl!r}")
        self.loc_kl = loc_kl

    def set_exclusion_window(self, window: int) -> None:
        """q's exclusion window for the location draws: an odd int ≥ 1 (SPEC §2). Each draw removes
        its window × window neighbourhood from the later draws' candidates (1 = the paper's eq. 11,
        only the drawn pixel). Used by the training draws, the importance-sampled bound and
        :meth:`infer`'s ``locations="top"``. Raises ValueError naming ``exclusion_window``; a window
        the canvas cannot hold (H·W ≤ (M − 1)·w²) is refused when the draws are made."""
        self._exclusion_window = _ops_api.check_exclusion_window(window, "exclusion_window")

    @property
    def exclusion_window(self) -> int:
        """q's exclusion window (see :meth:`set_exclusion_window`, which setting it calls)."""
        return self._exclusion_window

    @exclusion_window.setter
    def exclusion_window(self, window: int) -> None:
        self.set_exclusion_window(window)

    def _draw_window(self, H: int, W: int) -> dict:
        """The keyword arguments of gumbel_topk_relaxed for this model's exclusion window on an H×W
        canvas, or a ValueError naming ``exclusion_window`` where the canvas cannot hold it (checked
        here for both engines: the reference op does not check its arguments)."""
        if self._exclusion_window == 1:
            return {}
        _ops_api.check_exclusion(self._exclusion_window, (H, W), H * W, self.max_objects, "exclusion_window")
        return {"window": self._exclusion_window, "canvas": (H, W)}

    def set_count_window(self, window: int) -> None:
        """The counter's neighbourhood for n̂: an odd int ≥ 1 (window × window; SPEC §2's 3×3 is the
        default). Raises ValueError naming ``count_window`` otherwise."""
        self._count_window = _ops_api.check_window(window, "count_window")

    @property
    def count_window(self) -> int:
        """The counter's neighbourhood side (see :meth:`set_count_window`, which setting it calls)."""
        return self._count_window

    @count_window.setter
    def count_window(self, window: int) -> None:
        self.set_count_window(window)

    def accelerate(self, *, channels_last: bool = True, fused_norm: bool = True, compile: bool = False,
                   bf16: bool = False, compile_mode: Optional[str] = None) -> "LAVAE":
        """Switch on the fast paths for the convolutions; returns ``self``. The math is unchanged
        (bf16 aside, which rounds the convolutions' operands; see below).

        channels_last: the convolution weights and activations in NHWC (oneDNN's native layout on
            CPU; ~1.6× on the inference nets here). The appearance gather reads the channels-last
            h_app directly.
        fused_norm: every conv → Leaky ReLU → batch norm runs its last two as one op
            (:func:`lavae_fast.norm.lrelu_batch_norm`, C++ on CPU).
        compile: ``torch.compile`` the two inference nets with their heads (one graph) and the
            sprite decoder (dynamic in the number of present objects), each one whole graph. The
            rest of the step stays eager: the engine ops are fused kernels already, and the
            ELBO's terms are small. ``torch.compile(model)`` of the whole forward works too; its
            only graph breaks are the input and noise checks (they must read values) and
            ``_decode_present`` (how many objects are decoded depends on the data) — see
            tests/test_speed.py. Compilation: 10–30 s at the first step (and again in eval mode);
            it buys ~2% on CPU, where the convolutions are oneDNN calls either way.
        bf16: run the convolutions under bf16 autocast; batch-norm statistics, the heads' outputs
            and every engine op stay float32. Off by default here; a speed-up only where the device
            computes bf16 natively (a CPU with AVX-512 BF16 or AMX, a CUDA GPU that supports it):
            elsewhere (an AVX2-only CPU) it is emulated, ~9× slower. Ask the machine with
            :func:`lavae_fast.performance.bf16_native`, as the training CLI's ``--bf16 auto`` (its
            default) does. Its loss curve is tested against float32 where bf16 is native.
        compile_mode: passed to ``torch.compile`` (None = the default mode).
        """
        self._speed = SpeedConfig(channels_last=channels_last, fused_norm=fused_norm, compile=compile, bf16=bf16,
                                  compile_mode=compile_mode)
        self._compiled = {}
        use_fused_norm(self, fused_norm)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    @property
    def speed_config(self) -> "SpeedConfig":
        return self._speed

    def __getstate__(self):
        # Modules and compiled callables do not pickle: keep their names, rebuild them on load.
        state = super().__getstate__().copy()
        state["_compiled"] = {}
        state.pop("_ops", None)
        return state

    def __setstate__(self, state):
        state.setdefault("_count_window", 3)  # pickled before the option existed: the 3×3 counter
        state.setdefault("_exclusion_window", 1)  # likewise: the paper's one-pixel exclusion
        super().__setstate__(state)
        self.set_ops(self.ops_name)

    def _maybe_compiled(self, name: str, fn, **kw):
        if not self._speed.compile:
            return fn
        if name not in self._compiled:
            self._compiled[name] = torch.compile(fn, mode=self._speed.compile_mode, **kw)
        return self._compiled[name]

    def _autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self._speed.bf16)

    def location_parameters(self):
        """Parameters of the location inference net (its own learning rate, SPEC §5)."""
        return list(self.loc_net.parameters()) + list(self.loc_head.parameters())

    def parameter_groups(self) -> dict:
        """Parameter counts of the three parts named in appendix B, plus the prior."""
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        return {
            "location_inference": count(self.location_parameters()),
            "appearance_inference": count(list(self.app_net.parameters()) + list(self.app_head.parameters())),
            "sprite_generation": count(self.sprite_decoder.parameters()),
            "prior": self.prior_logits.numel(),
        }

    @staticmethod
    def gamma_for(H: int, W: int) -> float:
        """γ = ½·ln D (SPEC §2; the paper rounds it to 4 at 64×64, we keep the formula)."""
        return location_gamma(H * W)

    # -- pieces ----------------------------------------------------------------------------

    def check_input(self, x: Tensor, name: str = "x") -> None:
        check_images(x, self.channels, self.canvas, name)

    def _input(self, x: Tensor, name: str = "x") -> Tensor:
        """``x`` checked and cast to the parameters' dtype (see :func:`~lavae_fast.models.inputs.as_dtype`)."""
        self.check_input(x, name)
        return as_dtype(x, self.prior_logits.dtype)

    def prior_log_probs(self) -> Tensor:
        """log p(n) for n = 0..M ([M+1], a normalised distribution)."""
        return torch.log_softmax(self.prior_logits, dim=0)

    def encode(self, x: Tensor, *, check: bool = True):
        """x [B,C,H,W] → (h_app [B,2L,H,W], h_loc [B,1,H,W] γ-scaled, n̂ [B] int64)."""
        if check:
            x = self._input(x)
        H, W = x.shape[-2:]
        gamma = self.gamma_for(H, W)
        if self._speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast(x.device.type):
            h_app, h_loc = self._maybe_compiled("nets", self._inference_nets)(x)
        if self._speed.bf16:  # the engine ops and everything after them stay float32
            h_app, h_loc = h_app.float(), h_loc.float()
        h_loc = h_loc * gamma
        n_hat = self.engine.count_objects(h_loc.float(), THRESHOLD_IN_GAMMAS * gamma, self.max_objects,
                                        self._count_window)
        return h_app, h_loc, n_hat

    def _inference_nets(self, x: Tensor):
        """The two residual nets with their heads (unscaled): (h_app [B,2L,H,W], h_loc [B,1,H,W])."""
        return self.app_head(self.app_net(x)), self.loc_head(self.loc_net(x))

    def _decode_present(self, z_app: Tensor, n: Tensor) -> Tensor:
        """Sprites [B,M,C,S,S] with only the present slots decoded (zeros elsewhere), SPEC §2."""
        B, M, L = z_app.shape
        S, C = self.sprite_size, self.channels
        present = _ops_api.object_mask(n, M)
        out = z_app.new_zeros(B, M, C, S, S)
        if bool(present.any()):
            # The decoder (and its batch norm) sees only present objects. Their number varies from
            # batch to batch, so the compiled decoder is dynamic in it.
            decoder = self._maybe_compiled("decoder", self.sprite_decoder, dynamic=True)
            with self._autocast(z_app.device.type):
                sprites = decoder(z_app[present])
            out = out.index_put(present.nonzero(as_tuple=True), sprites.to(out.dtype))
        return out

    @staticmethod
    def _one_hot(index: Tensor, D: int, dtype) -> Tensor:
        """[B,M] flat indices (−1 = absent) → [B,M,D] one-hot rows (zero rows for −1)."""
        oh = F.one_hot(index.clamp(min=0), D).to(dtype)
        return oh * (index >= 0).to(dtype)[..., None]

    def _draw_noise(self, B: int, D: int, device, dtype) -> Noise:
        """Noise from torch's global RNG, for users' own loops (training uses lavae_fast.noise)."""
        u = torch.rand(B, D, device=device, dtype=torch.float64)
        return Noise(
            gumbel=gumbel_from_uniform(u).to(dtype),
            eps=torch.randn(B, self.max_objects, self.latent_size, device=device, dtype=dtype),
            coin=torch.rand(B, device=device, dtype=dtype),
        )

    # -- forward: the negative ELBO --------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        *,
        noise: Optional[Noise] = None,
        tau: float = 0.5,
        force_n_prob: float = 0.0,
        hard: Optional[bool] = None,
    ) -> LAVAEOutput:
        """One-sample estimate of the negative ELBO (SPEC §4) and everything inferred on the way.

        Args:
            x: [B,C,H,W] images in [0,1].
            noise: a :class:`lavae_fast.noise.Noise` for these B images; None draws it from torch's
                global RNG.
            tau: Gumbel-softmax temperature (see :func:`lavae_fast.schedules.tau`).
            force_n_prob: probability of forcing n = 1 per image (training recipe, SPEC §5); the
                image's coin is ``noise.coin``.
            hard: place the sprites at the hard draws and take the exact log q of them — the
                −ELBO of the model itself, as evaluation reports it — instead of the training
                objective of ``location_mode``. Default: hard in eval mode (``model.eval()``),
                the training objective in train mode (SPEC §3: relaxed samples only in training).
        """
        x = self._input(x)
        tau = check_tau(tau)
        force_n_prob = check_real(force_n_prob, "force_n_prob", minimum=0.0, maximum=1.0)
        B, C, H, W = x.shape
        D, M = H * W, self.max_objects
        h_app, h_loc, n_hat = self.encode(x, check=False)
        if noise is None:
            noise = self._draw_noise(B, D, x.device, h_loc.dtype)
        else:
            self._check_noise(noise, B, D)
        noise = noise.to(device=x.device, dtype=h_loc.dtype)

        forced = noise.coin < float(force_n_prob)
        # A forced image has q(n|x) = δ(n−1), so its count term is −log p(1): p(n) is fitted to the
        # counts the ELBO actually used (decision; the paper does not say).
        n = torch.where(forced, torch.ones_like(n_hat), n_hat)

        logits = h_loc.flatten(1)  # [B,D]
        window = self._draw_window(H, W)
        index, relaxed, log_q = self.engine.gumbel_topk_relaxed(logits, n, float(tau), M, noise.gumbel, **window)
        if hard is None:
            hard = not self.training
        if hard or self.location_mode == "straight_through":
            # Hard in value; in training (straight-through) the relaxed sample's gradient.
            onehot = self._one_hot(index, D, relaxed.dtype)
            z = onehot - relaxed.detach() + relaxed  # value: the hard draws; gradient: the relaxed ones
            kw = {"index": index}
        else:
            z = relaxed
            kw = {}
        z_maps = z.view(B, M, H, W)

        app = self.engine.gather_appearance(h_app, z_maps, n, **kw)  # [B,M,2L]
        mu, logvar = app.split(self.latent_size, dim=-1)
        present = _ops_api.object_mask(n, M)
        pf = present.to(mu.dtype)[..., None]
        z_app = (mu + torch.exp(0.5 * logvar) * noise.eps) * pf
        sprites = self._decode_present(z_app, n)
        loglik, lam = self.engine.place_and_loglik(x, sprites, z_maps, n, return_lambda=True, eps=EPS_LAMBDA, **kw)

        kl_app = (gaussian_kl(mu, logvar) * present.to(mu.dtype)).sum(1)
        kl_n = -self.prior_log_probs()[n]
        # The location term (loc_kl, see location_log_q; the default, "relaxed", is log q at the
        # relaxed sample). The option "straight_through": log q of the locations with the straight-through map, Σ_i ⟨z_i^ST, log b^(i)⟩ (SPEC §3).
        # Value: ⟨onehot_i, log b^(i)⟩ = log b^(i)[index_i], i.e. the op's exact log_q. Gradient:
        # through log b^(i) (the op's log_q already carries it: onehot − b^(i)) plus ⟨∂r_i, log b^(i)⟩
        # through the relaxed sample. On the allowed set log b^(i) = h − logsumexp_allowed(h), and
        # Σ_d ∂r_i[d] = 0 because r_i sums to 1 there, so the normaliser drops out; off the allowed
        # set r_i ≡ 0 and so does ∂r_i. Hence ⟨∂r_i, log b^(i)⟩ = ⟨∂r_i, h⟩, which is the gradient of
        # ⟨r_i − r_i.detach(), h.detach()⟩ — a term whose value is 0. Absent slots have r_i = 0.
        # Hard: the value is the exact log q of the draws (the straight-through form's value).
        log_q_loc = self.location_log_q(logits, relaxed, index, log_q, "straight_through" if hard else self.loc_kl,
                                        **window)
        log_p_loc = -self._log_falling(D, n, M, logits.dtype)
        kl_loc = log_q_loc - log_p_loc
        recon = -loglik
        neg_elbo = recon + kl_app + kl_n + kl_loc

        rows = torch.where(index >= 0, index // W, -1)
        cols = torch.where(index >= 0, index % W, -1)
        return LAVAEOutput(
            loss=neg_elbo.mean(), neg_elbo=neg_elbo, recon=recon, kl_app=kl_app, kl_n=kl_n, kl_loc=kl_loc,
            n_hat=n_hat, n=n, forced=forced, index=index, rows=rows, cols=cols, z_app=z_app,
            mu=mu * pf, logvar=logvar * pf, lam=lam, sprites=sprites, h_loc=h_loc, gamma=self.gamma_for(H, W),
        )

    @classmethod
    def location_log_q(cls, logits: Tensor, relaxed: Tensor, index: Tensor, log_q: Tensor, loc_kl: str, *,
                       window: int = 1, canvas: Optional[Tuple[int, int]] = None) -> Tensor:
        """The training term log q(z_loc) [B] picked by ``loc_kl`` (SPEC §3), from the outputs of
        ``gumbel_topk_relaxed(logits, …, window=window, canvas=canvas)``: index [B,M], relaxed
        [B,M,D], log_q [B] (exact)."""
        if loc_kl == "straight_through":
            st_term = ((relaxed - relaxed.detach()) * logits.detach()[:, None, :]).sum((1, 2))
            return log_q + st_term
        if loc_kl == "hard":
            # Exact log q of the hard draws; gradient onehot_i − b^(i) only. Its mean over the draws
            # is 0 (E_q[∂ log q] = 0): the KL's true gradient is all in the score-function term,
            # which is left out, so this term only adds zero-mean noise to h_loc's gradient.
            return log_q
        if loc_kl == "relaxed":
            return cls.relaxed_log_q(logits, relaxed, index, window=window, canvas=canvas)
        raise ValueError(f"loc_kl must be one of {', '.join(map(repr, cls.LOC_KL_CHOICES))}, got {loc_kl!r}")

    @staticmethod
    def relaxed_log_q(logits: Tensor, relaxed: Tensor, index: Tensor, *, window: int = 1,
                      canvas: Optional[Tuple[int, int]] = None) -> Tensor:
        """log q at the relaxed sample, Σ_i ⟨r_i, log b^(i)⟩ [B] (SPEC §3, ``loc_kl="relaxed"``).

        b^(i) = softmax(logits) over step i's candidates — the locations outside the ``window`` ×
        ``window`` neighbourhoods (on ``canvas`` (H, W); window 1: the pixels) of the hard draws
        ``index`` before step i — the same set r_i lives on (the op's rule, SPEC §2). Its gradient
        is ⟨∂r_i, log b^(i)⟩ = ⟨∂r_i, h⟩ (the normaliser drops out, Σ∂r_i = 0) plus r_i − b^(i)
        through log b^(i): the straight-through term's, with r_i in place of the one-hot. As
        τ → 0, r_i → onehot_i and the value → the exact log q.
        """
        B, M, D = relaxed.shape
        hard = F.one_hot(index.clamp(min=0), D).to(logits.dtype) * (index >= 0).to(logits.dtype)[..., None]
        if window != 1:
            H, W = canvas
            cover = F.max_pool2d(hard.view(B * M, 1, H, W), window, stride=1, padding=window // 2).view(B, M, D)
            hard = cover  # what each draw excludes from the later steps
        before = (hard.cumsum(1) - hard) > 0  # [B,M,D] excluded at a step < i
        log_b = torch.log_softmax(logits[:, None, :].masked_fill(before, float("-inf")), dim=-1)
        # r_i is exactly 0 (value and gradient) where log b^(i) = −∞: use 0 there, not −∞·0 = NaN.
        return (relaxed * log_b.masked_fill(before, 0.0)).sum((1, 2))

    def _check_noise(self, noise: Noise, B: int, D: int) -> None:
        """User-supplied noise is user data: shapes, and one finiteness check (one device sync,
        a graph break under torch.compile, like the input checks) for all of it."""
        M = self.max_objects
        if (noise.gumbel.shape != (B, D) or noise.eps.shape != (B, M, self.latent_size)
                or noise.coin.shape != (B,)):
            raise ValueError(
                f"noise does not match the batch: need gumbel [{B},{D}] and eps [{B},{M},{self.latent_size}], "
                f"got {tuple(noise.gumbel.shape)} and {tuple(noise.eps.shape)}"
            )
        parts = [noise.gumbel, noise.eps, noise.coin]
        if not bool(torch.stack([torch.isfinite(t).all() for t in parts]).all()):
            bad = [k for k, t in zip(("gumbel", "eps", "coin"), parts) if not bool(torch.isfinite(t).all())]
            raise ValueError(f"noise.{bad[0]} contains NaN or Inf")

    @staticmethod
    def _log_falling(D: int, n: Tensor, M: int, dtype) -> Tensor:
        """Σ_{i<n} log(D − i) [B]: minus the log-probability of n ordered uniform draws without
        replacement (slots past D, on a canvas smaller than n, are never drawn)."""
        i = torch.arange(M, device=n.device)
        terms = torch.log((D - i).clamp(min=1).to(dtype))
        return (terms[None, :] * ((i[None, :] < n[:, None]) & (i[None, :] < D)).to(dtype)).sum(1)
