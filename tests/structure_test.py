"""The package's structure: imports flow one way, no cycles, no private
cross-module imports (read from the source with `ast`, every import at
module or function level)."""

import ast
import os

from absl.testing import absltest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'act_jax')
# Layers from the bottom: a module may import its own layer and lower ones.
LAYERS = (
    ('act_jax.model', 'act_jax.distributed'),
    ('act_jax.io', 'act_jax.data'),
    ('act_jax.act',),
    ('act_jax.train',),
    ('act_jax.eval',),
    ('act_jax.pipeline',),
    ('act_jax.cases', 'act_jax.cli', 'act_jax.main', 'act_jax.convert',
     'act_jax.collect', 'act_jax.localize', 'act_jax.transfer'),
)


def modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(d, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
        name = rel.replace(os.sep, '.')
        out[name[:-len('.__init__')] if name.endswith('.__init__')
            else name] = path
  return out


def imports(path: str, mods) -> list[tuple[str, str, int, bool]]:
  """(imported module, imported name or '', line, at function level)."""
  tree = ast.parse(open(path, encoding='utf-8').read())
  nested = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
          nested.add(id(sub))
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith('act_jax'):
          out.append((a.name, '', node.lineno, id(node) in nested))
    elif isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith('act_jax')):
      for a in node.names:
        full = f'{node.module}.{a.name}'
        target = full if full in mods else node.module
        name = '' if full in mods else a.name
        out.append((target, name, node.lineno, id(node) in nested))
  return out


def layer(name: str) -> int:
  for i, prefixes in enumerate(LAYERS):
    if any(name == p or name.startswith(p + '.') for p in prefixes):
      return i
  return -1


class StructureTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.mods = modules()
    cls.edges = {m: imports(p, cls.mods) for m, p in cls.mods.items()}

  def test_no_import_cycle(self):
    graph = {m: {t for t, _, _, _ in e if t in self.mods and t != m}
             for m, e in self.edges.items()}
    # Packages' __init__ are docstrings only; an import of a package is an
    # import of its modules' namespace, not a cycle.
    state, stack = {}, []

    def visit(m):
      state[m] = 1
      stack.append(m)
      for n in sorted(graph[m]):
        if state.get(n) == 1:
          self.fail('import cycle: ' + ' -> '.join(
              stack[stack.index(n):] + [n]))
        if n not in state:
          visit(n)
      stack.pop()
      state[m] = 2

    for m in sorted(graph):
      if m not in state:
        visit(m)

  def test_no_private_cross_module_import(self):
    for m, edges in self.edges.items():
      for target, name, line, _ in edges:
        self.assertFalse(name.startswith('_') and not name.startswith('__'),
                         f'{self.mods[m]}:{line} imports {target}.{name}')

  def test_no_function_level_act_jax_import(self):
    for m, edges in self.edges.items():
      for target, name, line, nested in edges:
        self.assertFalse(nested, f'{self.mods[m]}:{line} imports {target} '
                         'inside a function')

  def test_imports_flow_down_the_layers(self):
    for m, edges in self.edges.items():
      for target, _, line, _ in edges:
        if target == 'act_jax':
          continue
        self.assertGreaterEqual(
            layer(m), layer(target),
            f'{self.mods[m]}:{line}: {m} (layer {layer(m)}) imports {target} '
            f'(layer {layer(target)}); imports flow main -> pipeline -> '
            '{act, train, eval, io, data} -> model')
        if not m.startswith('act_jax.cases'):
          self.assertFalse(target.startswith('act_jax.cases'),
                           f'{self.mods[m]}:{line}: the core imports a case')

  def test_every_module_has_a_docstring(self):
    for m, path in self.mods.items():
      tree = ast.parse(open(path, encoding='utf-8').read())
      self.assertTrue(ast.get_docstring(tree), f'{path} has no docstring')


if __name__ == '__main__':
  absltest.main()
