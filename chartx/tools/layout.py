"""How a tree of parameters lies on a mesh, as a table: a pod's layout, read on a laptop before renting it.

    abstract, shardings, _ = sharding.sharded_init(init, jax.sharding.AbstractMesh(...), rules)
    print(layout.describe(abstract.params, shardings.params))
"""

import math
from typing import Any

import jax
from jax.sharding import NamedSharding


def _leaves(tree: Any, shardings: Any) -> list[tuple[str, Any, NamedSharding]]:
  arrays = jax.tree_util.tree_flatten_with_path(tree)[0]
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  if len(arrays) != len(specs):
    raise ValueError(f"{len(arrays)} arrays but {len(specs)} shardings")
  return [(jax.tree_util.keystr(path, simple=True, separator="/"), x, s)
          for (path, x), s in zip(arrays, specs)]


def largest_replicated(tree: Any, shardings: Any) -> tuple[str, tuple[int, ...], int] | None:
  """(name, shape, bytes) of the largest array that every device holds whole; None if there is none."""
  whole = [(x.size * x.dtype.itemsize, name, tuple(x.shape))
           for name, x, s in _leaves(tree, shardings) if s.is_fully_replicated]
  if not whole:
    return None
  nbytes, name, shape = max(whole)
  return name, shape, nbytes


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """The bytes of `tree` that each device holds (shardings split arrays evenly)."""
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
             for _, x, s in _leaves(tree, shardings))


def describe(tree: Any, shardings: Any) -> str:
  """A table of how `tree` (arrays or jax.ShapeDtypeStructs, e.g. state.params) lies on the mesh.

  shardings is the matching tree of NamedShardings (e.g. sharding.sharded_init's shardings.params),
  whose mesh may be an AbstractMesh: a pod's layout can be read on a laptop.
  """
  leaves = _leaves(tree, shardings)
  mesh = leaves[0][2].mesh
  total = sum(x.size * x.dtype.itemsize for _, x, _ in leaves)
  per_device = bytes_per_device(tree, shardings)
  axes = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
  lines = [f"mesh {axes} ({mesh.size} devices): {sum(x.size for _, x, _ in leaves):,} parameters, "
           f"{_bytes(total)} in all, {_bytes(per_device)} on each device"]
  largest = largest_replicated(tree, shardings)
  lines.append("largest array every device holds whole: " + (
      f"{largest[0]} {largest[1]}, {_bytes(largest[2])}" if largest else "none"))
  width = max(len(name) for name, _, _ in leaves)
  for name, x, s in leaves:
    spec = ", ".join(str(a) for a in s.spec) if s.spec else "replicated"
    lines.append(f"  {name:<{width}}  {str(tuple(x.shape)):<18} {spec:<32} "
                 f"per device {tuple(s.shard_shape(x.shape))}")
  return "\n".join(lines)


def _bytes(nbytes: float) -> str:
  """1,234 B, 5.6 KiB, 7.8 MiB or 9.1 GiB."""
  if nbytes < 1024:
    return f"{nbytes:,.0f} B"
  exponent = min(int(math.log(nbytes, 1024)), 3)
  return f"{nbytes / 1024**exponent:,.1f} {('KiB', 'MiB', 'GiB')[exponent - 1]}"
