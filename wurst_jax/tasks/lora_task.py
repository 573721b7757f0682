"""Any family's task with low-rank adapters on its frozen networks (`wurst_jax.lora`, config.lora.rank > 0).

The trained params are the adapters alone, {'lora': {network: ...}}, so the optimizer, EMA and
checkpoints hold nothing else. The base (every network the family would train, from `lora.base` or the
family's own pretrained init) is a frozen input of the step, boxed with its logical axes so the loop
shards it by the same rules as a full fine-tune's params. The family's `grads` runs on the base with
the adapters attached and only the adapters' gradients are returned: the base's weight gradients are
never consumed, so XLA drops them from the compiled step.
"""

import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wurst_jax import checkpoint, convert, lora
from wurst_jax.config_lib import ConfigError
from wurst_jax.convert import lora as lora_format
from wurst_jax.models.layers import DTYPES
from wurst_jax.tasks import formats
from wurst_jax.tasks.base import Task

BASE = 'lora_base'  # the frozen entry holding the base networks
RECORD = 'lora_base.json'  # in the workdir: where the base came from and its content hash


def content_hash(params: Any) -> str:
    """sha256 over the base's parameter paths, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(traverse_util.flatten_dict(params).items()):
        value = np.asarray(value)
        digest.update(f'{"/".join(key)}:{value.shape}:{value.dtype};'.encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


class LoraTask:
    """The Task contract around `inner`, training adapters only."""

    def __init__(self, inner: Task):
        self.inner, self.config, self.tokenizer = inner, inner.config, inner.tokenizer
        self.scale = lora.scale(self.config)
        example = {k: jax.ShapeDtypeStruct((1, *shape), dtype) for k, (shape, dtype) in inner.batch_spec().items()}
        self._boxed = jax.eval_shape(inner.init, jax.random.PRNGKey(0), example)[0]
        # Shapes without their boxes, unconstrained: base() may be called under a mesh's logical rules.
        self._shapes = jax.tree.map(
            lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
            self._boxed,
            is_leaf=lambda x: isinstance(x, nn.Partitioned),
        )
        lora.target_kernels(self._shapes, self.config.lora.targets)  # a pattern matching nothing
        self._base = None
        self._shapes_only = convert.reading_shapes_only()  # a plan: the base's shapes, nothing read

    def batch_spec(self):
        return self.inner.batch_spec()

    def init(self, rng: jax.Array, batch):
        _, model_state = self.inner.init(rng, batch)
        return {'lora': lora.init_adapters(jax.random.fold_in(rng, 1), self._boxed, self.config)}, model_state

    def pretrained_params(self):
        """{'lora': adapters} read from lora.init_from (a LoRA file in the format `wurst_jax.export`
        writes, e.g. trained elsewhere), else {}: adapters it lacks start from their initialisation."""
        source = self.config.lora.init_from
        if not source:
            return {}
        name, module, component, prefix = formats.diffusers_network(self.inner)
        try:
            loaded = lora_format.from_diffusers(module, component, self.base()[name], lora_format.read(source), prefix)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError('lora.init_from', source, f'a LoRA file for this {component} ({e})') from None
        want = traverse_util.flatten_dict(
            jax.eval_shape(lambda r: lora.init_adapters(r, self._shapes, self.config), jax.random.PRNGKey(0))
        )
        ours = {(name, *k): v for k, v in traverse_util.flatten_dict(loaded).items()}
        if unknown := sorted('/'.join(k[:-1]) for k in ours if k not in want):
            raise ConfigError(
                'lora.targets',
                self.config.lora.targets,
                f'patterns matching every module lora.init_from adapts; {unknown[:5]} are not',
            )
        if other := sorted({v.shape[-1 if k[-1] == lora.A else -2] for k, v in ours.items()} - {self.config.lora.rank}):
            raise ConfigError(
                'lora.rank', self.config.lora.rank, f'the rank of the adapters in lora.init_from, {other}'
            )
        # The file's lora_B holds the scale the branch had there; ours multiplies by alpha / rank.
        adapters = {k: v / self.scale if k[-1] == lora.B else v for k, v in ours.items()}
        return {'lora': traverse_util.unflatten_dict(adapters)}

    def base(self) -> Any:
        """The base networks (host arrays in lora.base_dtype), checked to be the whole model the config builds."""
        if self._base is not None:
            return self._base
        dtype = DTYPES[self.config.lora.base_dtype]
        if self._shapes_only:
            return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), self._shapes)
        source = self.config.lora.base
        loaded = checkpoint.load_params(source, ema=True) if source else self.inner.pretrained_params()
        want = traverse_util.flatten_dict(self._shapes)
        got = traverse_util.flatten_dict(loaded)
        missing = sorted('/'.join(k) for k in want if k not in got)
        wrong = sorted('/'.join(k) for k in want if k in got and tuple(got[k].shape) != tuple(want[k].shape))
        if missing or wrong:
            field = 'lora.base' if source else 'init'
            raise ConfigError(
                field,
                self.base_source(),
                f'a base holding every param of the model the config builds; missing {missing[:5]}, '
                f'other shapes {wrong[:5]} ({len(missing)} and {len(wrong)} in all): give the run or folder '
                'of this architecture, or the model config it was trained with',
            )
        self._base = traverse_util.unflatten_dict({k: np.asarray(got[k]).astype(dtype) for k in want})
        return self._base

    def base_source(self) -> str:
        """Where the base comes from: lora.base, else the family's init folders (init.prior, init.decoder)."""
        inits = [v for v in self.config.get('init', {}).values() if v]
        return self.config.lora.base or ', '.join(inits) or 'the family init'

    def base_record(self) -> dict[str, str]:
        return {'source': self.base_source(), 'sha256': content_hash(self.base())}

    def check_base(self, workdir: str) -> None:
        """Writes the base's record on a run's first start; on a resume, refuses a base that has changed."""
        path = os.path.join(workdir, RECORD)
        record = self.base_record()
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved['sha256'] != record['sha256']:
                raise ConfigError(
                    'lora.base',
                    self.base_source(),
                    f"the base this run's adapters were trained on ({saved['source']}, sha256 {saved['sha256'][:12]}); "
                    f'this one hashes to {record["sha256"][:12]}: give that base, or a new --workdir',
                )
        elif jax.process_index() == 0:
            with open(path, 'w') as f:
                json.dump(record, f, indent=2)

    def frozen_params(self):
        boxed = jax.tree.map(
            lambda box, value: box.replace_boxed(value) if isinstance(box, nn.Partitioned) else value,
            self._boxed,
            self.base(),
            is_leaf=lambda x: isinstance(x, nn.Partitioned),
        )
        return {**self.inner.frozen_params(), BASE: boxed}

    def optimizer(self):
        return self.inner.optimizer()

    def merged(self, params, frozen) -> Any:
        """The family's params: the base with the adapters folded in."""
        return lora.merge(frozen[BASE], params['lora'], self.scale)

    def grads(self, params, model_state, frozen, batch, rng, step):
        attached = lora.attach(frozen[BASE], params['lora'])
        with lora.adapted(self.scale, self.config.lora.dropout):
            grads, model_state, metrics = self.inner.grads(
                attached, model_state, inner_frozen(frozen), batch, rng, step
            )
        return {'lora': lora.split(grads)}, model_state, metrics

    def visualize(self, params, model_state, frozen, batch):
        return self.inner.visualize(self.merged(params, frozen), model_state, inner_frozen(frozen), batch)

    def evaluate(self, params, model_state, frozen, batches):
        merged = jax.jit(self.merged)(params, frozen)
        return self.inner.evaluate(merged, model_state, inner_frozen(frozen), batches)


def inner_frozen(frozen: dict) -> dict:
    """The family's own frozen networks: the LoRA task's frozen inputs less the base."""
    return {k: v for k, v in frozen.items() if k != BASE}


def as_trained(task: LoraTask, params: Any) -> tuple[Task, Any]:
    """(the family's task, its params) of a trained LoRA run's adapters: the base merged with them."""
    merged = lora.merge(task.base(), jax.tree.map(jnp.asarray, params['lora']), task.scale)
    return task.inner, jax.device_get(merged)
