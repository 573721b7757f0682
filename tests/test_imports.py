"""The package's import graph, read with `ast` (nothing imported): no cycles, counting imports inside
functions too, and no training machinery in the model files; every family has the task contract's
members."""

import ast
import inspect
import pathlib

import pytest

from conftest import REPO
from wurst_jax import tasks
from wurst_jax.tasks import base

PACKAGE = REPO / 'wurst_jax'
TRAINING_PACKAGES = ('optax', 'orbax', 'grain', 'tensorflow_datasets', 'clu')


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def imported_names(name: str, path: pathlib.Path) -> set[str]:
    """Every dotted name module `name` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base_name = node.module or ''
            if node.level:
                package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
                package = package[: len(package) - node.level + 1]
                base_name = '.'.join(package + ([node.module] if node.module else []))
            found.add(base_name)
            found.update(f'{base_name}.{a.name}' for a in node.names)
    return found


def package_edges(name: str, path: pathlib.Path) -> set[str]:
    """The package's modules that importing `name` runs: each imported module and the packages above
    it, except the packages `name` itself is inside (they are already loading when it runs)."""
    edges = set()
    for imported in imported_names(name, path):
        parts = imported.split('.')
        for i in range(1, len(parts) + 1):
            module = '.'.join(parts[:i])
            if module in MODULES and module != name and not name.startswith(module + '.'):
                edges.add(module)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state, path = {}, []

    def visit(node):
        state[node] = 'open'
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 'done'
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_the_package_has_no_import_cycle():
    graph = {name: package_edges(name, path) for name, path in MODULES.items()}
    assert len(graph) > 40 and graph['wurst_jax.train'] >= {'wurst_jax.tasks', 'wurst_jax.checkpoint'}
    cycle = find_cycle(graph)
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


@pytest.mark.parametrize('name', sorted(n for n in MODULES if n.startswith('wurst_jax.models.')))
def test_model_files_import_no_training_machinery(name):
    bad = sorted(
        m
        for m in imported_names(name, MODULES[name])
        if m.split('.')[0] in TRAINING_PACKAGES
        or m.startswith(('wurst_jax.tasks', 'wurst_jax.train', 'wurst_jax.checkpoint', 'wurst_jax.data'))
    )
    assert not bad, f'{name} imports {bad}'


def test_the_loop_reads_no_weights_files_or_photos():
    loop = imported_names('wurst_jax.train', MODULES['wurst_jax.train'])
    assert not loop & {'wurst_jax.convert', 'wurst_jax.data.photos', 'wurst_jax.models.layers'}, loop


def _contract(protocol) -> dict[str, inspect.Signature]:
    return {k: inspect.signature(v) for k, v in vars(protocol).items() if callable(v) and not k.startswith('_')}


@pytest.mark.parametrize('family', sorted(tasks.FAMILIES))
def test_every_family_has_the_task_contract(family):
    cls = tasks.FAMILIES[family]
    for member, signature in _contract(base.Task).items():
        assert hasattr(cls, member), f'{cls.__name__} lacks {member}'
        wanted = [p for p in signature.parameters if p != 'self']
        got = [p for p in inspect.signature(getattr(cls, member)).parameters if p != 'self']
        assert got[: len(wanted)] == wanted, f'{cls.__name__}.{member}{tuple(got)}: the contract has {tuple(wanted)}'
