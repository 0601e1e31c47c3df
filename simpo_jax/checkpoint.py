"""Orbax checkpoints of the train state and the data iterator position: async save, keep-last-K, resume.

Arrays are saved as the global sharded arrays they are; restoring takes the shardings of the state it
restores into, so a run can resume on a different mesh than the one that saved.
"""
from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

log = logging.getLogger(__name__)


def to_plain(tree: Any) -> Any:
    """The same tree with NNX Variables replaced by their arrays (what Orbax stores)."""
    return jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, tree,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def from_plain(template: Any, plain: Any) -> Any:
    """Put arrays of a plain tree back into the Variables of `template` (same structure)."""
    leaves = iter(jax.tree.leaves(plain))
    return jax.tree.map(lambda v: v.replace(next(leaves)) if isinstance(v, nnx.Variable) else next(leaves),
                        template, is_leaf=lambda x: isinstance(x, nnx.Variable))


class Checkpointer:
    """Save every `every` steps (asynchronously), keep the last `keep`, restore the latest complete one."""

    def __init__(self, directory: str, every: int, keep: int = 3, async_save: bool = True):
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Start saving `state` and the iterator position at `step` (when due, or when forced)."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(to_plain(state)),
                                  data=ocp.args.JsonSave(dict(data_state)))
        return self.manager.save(step, args=args, force=force)

    def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state with the template's shardings, iterator position, step) of the latest or given checkpoint."""
        step = self.latest_step() if step is None else step
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                to_plain(state_template))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        log.info("restored checkpoint of step %d", step)
        return from_plain(state_template, restored["state"]), dict(restored["data"]), step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
