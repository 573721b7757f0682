"""Optimizers from the config: AdamW, warm-up + cosine/constant schedule, global-norm clipping."""

from typing import Any

import ml_collections
import optax


def lr_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to opt.lr, then cosine decay to 0 at total_steps, or constant."""
    if opt.schedule == 'cosine':
        return optax.warmup_cosine_decay_schedule(
            0.0, opt.lr, warmup_steps=opt.warmup_steps, decay_steps=max(total_steps, opt.warmup_steps + 1)
        )
    constant = optax.constant_schedule(opt.lr)
    if opt.warmup_steps == 0:
        return constant
    warmup = optax.linear_schedule(0.0, opt.lr, opt.warmup_steps)
    return optax.join_schedules([warmup, constant], [opt.warmup_steps])


def adamw(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW on float32 master weights, clipped by global norm first when opt.grad_clip > 0."""
    tx = optax.adamw(lr_schedule(opt, total_steps), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
    return tx


def learning_rate(config: ml_collections.ConfigDict, step: Any) -> Any:
    """The main optimizer's learning rate at `step`, as the loop logs it."""
    return lr_schedule(config.optimizer, config.total_steps)(step)
