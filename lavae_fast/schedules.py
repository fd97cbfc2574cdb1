"""Training schedules of SPEC §5 as pure functions of (step, steps).

``steps`` is the run's whole budget; the paper's schedule is ``steps = 100_000``. Every milestone
scales with it (SPEC §5: "all step counts must scale with a single --steps budget"), so a short CPU
run keeps the shape of the paper's schedule:

=========================  ==========================================================  ===========
quantity                   paper (100k steps)                                           here
=========================  ==========================================================  ===========
τ (Gumbel temperature)     0.5 → 0.02 exponentially over 100k                           0 → steps
location-net lr factor     ×1 → ×0.01 exponentially over 100k                           0 → steps
warm-up loss weight        1 for 30k, then linear → 0 over the next 30k                 30%, 30%
forced n = 1 probability   1 for 30k, then linear → 0.1 over the next 30k, then 0.1     30%, 30%
β (baseline)               0 → 1 linearly over 100k                                     0 → steps
=========================  ==========================================================  ===========

Past the horizon (a run resumed with more steps than planned, say) every schedule holds its final
value. All functions take plain numbers and return floats, so they are trivially testable and
resuming at step k gives exactly the value an uninterrupted run had at step k.
"""

from __future__ import annotations

__all__ = [
    "PAPER_STEPS",
    "LR",
    "progress",
    "tau",
    "loc_lr_factor",
    "warmup_weight",
    "force_n_prob",
    "beta",
    "WARMUP_FRACTION",
    "ANNEAL_FRACTION",
]

PAPER_STEPS = 100_000
LR = 1e-3  # Adamax, every parameter but the location net's (paper appendix B)
WARMUP_FRACTION = 0.3  # 30k of 100k
ANNEAL_FRACTION = 0.3  # the next 30k of 100k

TAU_START, TAU_END = 0.5, 0.02
LOC_LR_DECAY = 100.0
FORCE_N_FINAL = 0.1


def _check(step, steps):
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def progress(step: float, steps: float) -> float:
    """Fraction of the horizon done, clipped to [0, 1]."""
    _check(step, steps)
    return min(float(step) / float(steps), 1.0)


def tau(step: float, steps: float) -> float:
    """Gumbel-softmax temperature: 0.5 → 0.02 exponentially over the horizon."""
    return TAU_START * (TAU_END / TAU_START) ** progress(step, steps)


def loc_lr_factor(step: float, steps: float, decay: float = LOC_LR_DECAY) -> float:
    """Multiplier of the location-inference net's learning rate: 1 → 1/decay exponentially
    (decay = 100 in the paper)."""
    if not decay > 0:
        raise ValueError(f"decay must be > 0, got {decay}")
    return decay ** (-progress(step, steps))


def _ramp(step: float, steps: float) -> float:
    """0 during the warm-up (first 30%), then linear 0 → 1 over the next 30%, then 1."""
    p = progress(step, steps)
    return min(max((p - WARMUP_FRACTION) / ANNEAL_FRACTION, 0.0), 1.0)


def warmup_weight(step: float, steps: float) -> float:
    """Weight of the auxiliary h_loc loss: 1 for 30%, then linear to 0 over the next 30%."""
    return 1.0 - _ramp(step, steps)


def force_n_prob(step: float, steps: float) -> float:
    """Probability of forcing n = 1 per image: 1 for 30%, linear to 0.1 over the next 30%."""
    return 1.0 - (1.0 - FORCE_N_FINAL) * _ramp(step, steps)


def beta(step: float, steps: float) -> float:
    """β of the β-VAE baseline: 0 → 1 linearly over the horizon."""
    return progress(step, steps)
