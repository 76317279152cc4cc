"""APGD with EOT (after Croce and Hein 2020, "Reliable evaluation of adversarial robustness with
an ensemble of diverse parameter-free attacks"), for randomised defences, at a fixed budget.

Budget: `steps` gradient iterations per example in all, shared between the restarts; each
iteration is `eot` forward + backward passes (one per crafting draw; one on a deterministic
model, whose draws would all agree), so the attack spends
steps x eot gradient evaluations per example, as PGD-EOT with the same steps and eot does. On
top come `select_draws` forward passes for each of its 3 x restarts candidates (selection.py).

Within a restart of n iterations (n gradients, n - 1 steps):
- step size: starts at `initial_step` (2 eps, APGD's choice; eps / 2 on a randomised model)
  per example; at checkpoints after
  0.22 n steps, then at intervals shrinking by 0.03 n down to at least 0.06 n (and never closer
  than MIN_INTERVAL steps), it is halved for an example whose loss rose in fewer than RHO = 75%
  of the interval's steps, or whose step was not halved at the last checkpoint and whose best
  loss has not improved since; an example whose step is halved goes back to its best point, on
  a deterministic model. On a randomised one the best loss is the largest of noisy estimates
  (the winner's curse: measured, jumping back there cost 4 points of accuracy on a noisy model),
  so the point stays a candidate, judged on fresh draws at the end, and the run goes on.
  On a randomised model the loss of one iteration is itself a noisy estimate: its rises are
  close to coin flips, fewer than RHO of them on any plateau, so APGD's review halved the step at
  every checkpoint (measured: 2.6 points weaker than plain PGD-EOT on a DiffPure-style purifier
  at 20 iterations x 2 draws). There the review (RANDOMISED_REVIEW) instead compares the mean
  loss over the interval's iterations with the mean over the interval before (the start's loss
  for the first) and halves the step when that smoothed loss did not rise, and the first step
  is eps / 2 instead of 2 eps (a sign step of 2 eps jumps to the corner that one noisy gradient
  points at). Measured on that purifier (128 images, R = 10): the old review 65.3 % mean, 43.8 %
  worst; plain PGD-EOT 62.7 / 36.7; this one 63.2 / 34.4 (the interval mean alone, from 2 eps:
  67.0 / 39.8).
- momentum: x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1 - a)(x_k - x_{k-1})) with
  z_{k+1} = P(x_k + step * ascent(gradient)), a = `momentum` (0.75, APGD's), a = 1 on the
  first step.
- loss: restarts alternate cross-entropy and the margin loss (DLR with >= 3 classes, CW
  otherwise) for loss "ce+margin"; "ce" or "margin" use one throughout.
- gradient: the draws' gradients combined by `eot_weighting` (em_weighting.py); with `graft`,
  combined at the purified images and grafted onto one draw's backward pass (grafting.py).
- every restart but a first without random_start begins at a random point of the ball; with
  `start`, the first begins there instead (later restarts stay random).
- restarts: default one per ITERATIONS_PER_RESTART (100) iterations (AutoAttack's APGD-CE then
  APGD-DLR at 200).
Each restart keeps three candidates per example: the point of highest loss, the point most
crafting draws got wrong and the last point. The answer is the candidate chosen on fresh draws
(selection.py). Two forward passes of one image per batch learn the number of classes and
whether the model is randomised.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from purifyguard.evaluation.em_weighting import combine_draws
from purifyguard.evaluation.grafting import check_graftable, grafted_draws
from purifyguard.evaluation.losses import attack_loss
from purifyguard.evaluation.pgd import (
    ascent,
    eot_draws,
    probe_model,
    project,
    random_delta,
    starting_point,
)
from purifyguard.evaluation.selection import select_candidates
from purifyguard.evaluation.trace import AttackTrace

LOSS_PLANS = ("ce+margin", "ce", "margin")
RHO = 0.75
FIRST_CHECKPOINT, CHECKPOINT_SHRINK, MIN_CHECKPOINT = 0.22, 0.03, 0.06
CANDIDATES_PER_RESTART = 3
ITERATIONS_PER_RESTART = 100  # AutoAttack's APGD: 100 iterations per loss
MIN_INTERVAL = 3
RANDOMISED_REVIEW = "interval mean loss"  # how a randomised model's step is reviewed (above)
RANDOMISED_INITIAL_STEP = 0.5  # x eps: a randomised model's first step size (above)


def apgd_eot(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float, steps: int,
    eot: int = 1, norm: str = "linf", restarts: int | None = None, loss: str = "ce+margin",
    momentum: float = 0.75, initial_step: float | None = None, select_draws: int = 4,
    eot_weighting: str = "mean", graft: bool = False, random_start: bool = True,
    selection_seed: int = 0, chunk_size: int | None = None,
    on_step: Callable[[], object] | None = None, trace: AttackTrace | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adversarial images within `eps` of `images` (see the module docstring for the method).

    on_step is called after each of the `steps` gradient iterations; trace records the crafting
    draws' answers at every iteration and where each restart begins. start: adversarial images
    (within the ball) where the first restart begins instead of its random (or, without
    random_start, clean) start; later restarts draw random points as always. None: no change.
    """
    if loss not in LOSS_PLANS:
        raise ValueError(f"loss must be one of {LOSS_PLANS}, got {loss!r}")
    if restarts is None:
        restarts = default_restarts(steps)
    if not 1 <= restarts <= steps:
        raise ValueError(f"restarts must lie in [1, steps={steps}], got {restarts}")
    if graft:
        check_graftable(model)
    clean = images.detach()
    first = None if start is None else starting_point(clean, start, eps, norm)
    n_classes, randomised = probe_model(model, clean[:1])
    candidates, crafting_wrong = [], []
    for restart, iterations in enumerate(split_budget(steps, restarts)):
        name = loss if loss != "ce+margin" else ("ce" if restart % 2 == 0 else "margin")
        begin = clean
        if restart == 0 and first is not None:
            begin = first
        elif restart > 0 or random_start:
            begin = project(clean, clean + random_delta(clean, eps, norm), eps, norm)
        if trace is not None:
            trace.start_restart()
        found = _restart(
            model, clean, begin, labels, attack_loss(name, n_classes), iterations=iterations,
            eps=eps, eot=eot if randomised else 1, norm=norm, momentum=momentum,
            initial_step=(initial_step if initial_step is not None
                          else RANDOMISED_INITIAL_STEP * eps if randomised else 2 * eps),
            eot_weighting=eot_weighting, graft=graft, jump_to_best=not randomised,
            chunk_size=chunk_size, on_step=on_step, trace=trace,
        )
        candidates += found[0]
        crafting_wrong += found[1]
    stacked = torch.stack(candidates)
    if select_draws > 0:
        return select_candidates(model, stacked, labels, select_draws, selection_seed)[0]
    chosen = torch.stack(crafting_wrong).argmax(0)  # no fresh draws: the crafting draws decide
    return stacked[chosen, torch.arange(len(labels), device=chosen.device)]


def default_restarts(steps: int) -> int:
    """One restart per ITERATIONS_PER_RESTART gradient iterations, at least one: APGD's schedule
    needs room, and at CPU budgets (tens of iterations) splitting them costs more than a
    second start finds (measured: docs/evaluation.md)."""
    return max(1, steps // ITERATIONS_PER_RESTART)


def split_budget(steps: int, restarts: int) -> list[int]:
    """Gradient iterations of each restart: `steps` split as evenly as possible."""
    return [steps // restarts + (1 if r < steps % restarts else 0) for r in range(restarts)]


def checkpoints(n_steps: int) -> list[int]:
    """The step counts (1-based) after which the step size is reviewed, for n_steps steps.

    APGD's: w_j = ceil(p_j n_steps) with p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
    0.06); here two reviews are at least MIN_INTERVAL steps apart, so that a short run (the
    few-iteration budgets of a CPU) does not halve its step at every iteration on the strength
    of one or two noisy loss comparisons.
    """
    fractions, previous, current = [], 0.0, FIRST_CHECKPOINT
    while current <= 1 + 1e-9:
        fractions.append(current)
        previous, current = current, current + max(current - previous - CHECKPOINT_SHRINK,
                                                   MIN_CHECKPOINT)
    points, last = [], 0
    for fraction in fractions:
        point = math.ceil(fraction * n_steps - 1e-9)
        if point - last >= MIN_INTERVAL and point <= n_steps:
            points.append(point)
            last = point
    return points


def _restart(
    model: nn.Module, clean: torch.Tensor, start: torch.Tensor, labels: torch.Tensor, loss,
    *, iterations: int, eps: float, eot: int, norm: str, momentum: float, initial_step: float,
    eot_weighting: str, graft: bool, jump_to_best: bool, chunk_size: int | None, on_step,
    trace: AttackTrace | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One APGD run from `start`: ([highest-loss point, most-wrong point, last point], their
    crafting draws' wrong counts)."""
    per_example = (-1, *([1] * (clean.dim() - 1)))

    def evaluate(point: torch.Tensor):
        if graft:
            gradient, draws = grafted_draws(model, point, labels, eot, chunk_size, loss,
                                            eot_weighting)
        else:
            draws = eot_draws(model, point, labels, eot, chunk_size, loss)
            gradient = combine_draws(draws, eot_weighting)
        if trace is not None:
            trace.record(draws.correct)
        if on_step is not None:
            on_step()
        return gradient, draws.losses.mean(0), (~draws.correct).sum(0)

    x = start
    gradient, current_loss, wrong = evaluate(x)
    best_x, best_loss, best_gradient = x.clone(), current_loss.clone(), gradient.clone()
    best_loss_wrong = wrong.clone()
    worst_x, most_wrong = x.clone(), wrong.clone()
    step = torch.full((len(x),), float(initial_step), device=x.device, dtype=x.dtype)
    previous = x
    increases = torch.zeros(len(x), device=x.device)
    loss_at_check, halved_at_check = best_loss.clone(), torch.ones_like(increases, dtype=torch.bool)
    review, since_check = set(checkpoints(iterations - 1)), 0
    interval_sum, previous_mean = torch.zeros_like(current_loss), current_loss.clone()
    for k in range(1, iterations):
        z = project(clean, x + step.view(per_example) * ascent(gradient, norm), eps, norm)
        weight = 1.0 if k == 1 else momentum
        x, previous = project(clean, x + weight * (z - x) + (1 - weight) * (x - previous),
                              eps, norm), x
        last_loss = current_loss
        gradient, current_loss, wrong = evaluate(x)
        increases += (current_loss > last_loss).float()
        interval_sum += current_loss
        since_check += 1
        better = current_loss > best_loss
        best_x[better], best_gradient[better] = x[better], gradient[better]
        best_loss[better], best_loss_wrong[better] = current_loss[better], wrong[better]
        fooled_more = wrong >= most_wrong
        worst_x[fooled_more], most_wrong[fooled_more] = x[fooled_more], wrong[fooled_more]
        if k in review:
            if jump_to_best:  # a deterministic model: APGD's own review
                stalled = increases < RHO * since_check
                no_progress = ~halved_at_check & (best_loss <= loss_at_check)
                halve = stalled | no_progress
            else:  # a randomised one: the interval's mean loss against the interval's before
                interval_mean = interval_sum / since_check
                halve = interval_mean <= previous_mean
                previous_mean = interval_mean
            step[halve] /= 2
            x, gradient = x.clone(), gradient.clone()
            if jump_to_best:
                x[halve], gradient[halve] = best_x[halve], best_gradient[halve]
                current_loss = torch.where(halve, best_loss, current_loss)
            previous = torch.where(halve.view(per_example), x, previous)
            halved_at_check, loss_at_check = halve, best_loss.clone()
            increases.zero_()
            interval_sum = torch.zeros_like(interval_sum)
            since_check = 0
    return [best_x, worst_x, x], [best_loss_wrong, most_wrong, wrong]

