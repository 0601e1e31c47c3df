"""Orbax checkpoints of the train state and the data iterator position: async save, keep-last-K, resume.

Arrays are saved as the global sharded arrays they are; restoring takes the shardings of the state it
restores into, so a run can resume on a different mesh than the one that saved. A step whose files are
damaged (truncated, partly copied, missing) is warned about and moved aside; the run resumes from the newest
checkpoint that restores. A LoRA run saves the adapters and their optimizer state only, with their shapes and the frozen
base's identity (its shapes and per-layer checksums): resuming on another base, other adapters, or across a
switch between LoRA and full fine-tuning is refused with one line.
"""
from __future__ import annotations

import functools
import gc
import logging
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from simpo_jax.distributed import any_process
from simpo_jax.errors import UserError
from simpo_jax.models.lora import join, split_trainable

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


class ResumeError(UserError):
    """Checkpoints exist but none of them restores (or a damaged one cannot be moved aside); names the directory."""


class IncompatibleCheckpointError(ResumeError):
    """A sound checkpoint that is not this run's kind: LoRA vs full fine-tuning, other adapters, another base."""


def _saved_part(state: Any) -> tuple[Any, Any]:
    """(what a checkpoint stores, the frozen base or None): a LoRA state's adapters and optimizer state only."""
    params = getattr(state, "params", None)
    trainable, frozen = split_trainable(params) if params is not None else (None, None)
    return (state if frozen is None else state._replace(params=trainable)), frozen


def _stacked(path: tuple) -> bool:
    """Whether a state path is a scanned layers' parameter (a leading `layers` axis)."""
    return len(path) > 1 and getattr(path[0], "key", None) == "layers" and isinstance(getattr(path[1], "key", 0), str)


@functools.partial(jax.jit, static_argnums=1)
def _checksums(leaves: list, stacked: tuple[bool, ...]) -> list:
    """Per tensor (per layer when stacked): float32 sums of |w|, of w and of w^2."""
    out = []
    for x, by_layer in zip(leaves, stacked):
        x, axes = x.astype(jnp.float32), tuple(range(1, x.ndim)) if by_layer else None
        out.append(jnp.stack([jnp.sum(jnp.abs(x), axes), jnp.sum(x, axes), jnp.sum(x * x, axes)], axis=-1))
    return out


def lora_identity(adapters: Any, frozen: Any) -> dict:
    """What adapters need to go on training: their shapes, and the base's tensor shapes and checksums (per layer;
    a sharded reduction, no gathering)."""
    leaves = jax.tree_util.tree_flatten_with_path(to_plain(frozen))[0]
    sums = jax.device_get(_checksums([x for _, x in leaves], tuple(_stacked(k) for k, _ in leaves)))
    adapter_leaves = jax.tree_util.tree_flatten_with_path(to_plain(adapters))[0]
    return {"base": {jax.tree_util.keystr(k): {"shape": list(x.shape), "sums": np.asarray(v).tolist()}
                     for (k, x), v in zip(leaves, sums)},
            "adapters": {jax.tree_util.keystr(k): list(x.shape) for k, x in adapter_leaves}}


def check_identity(saved: dict, current: dict, where: str) -> None:
    """Raise IncompatibleCheckpointError (one line) unless the adapters and base saved are this run's (the
    checksums within 1e-4 of the sum of |w| / of w^2: summation order differs across meshes)."""
    for name in sorted(set(saved["adapters"]) | set(current["adapters"])):
        a, b = saved["adapters"].get(name), current["adapters"].get(name)
        if a != b:
            raise IncompatibleCheckpointError(
                f"{where} holds other LoRA adapters ({name}: saved {a or 'absent'}, this run {b or 'absent'}): set "
                "model.lora's rank and targets as the run that saved it did")
    for name in sorted(set(saved["base"]) | set(current["base"])):
        a, b = saved["base"].get(name), current["base"].get(name)
        same = a is not None and b is not None and a["shape"] == b["shape"]
        if same:
            x, y = np.asarray(a["sums"], np.float64), np.asarray(b["sums"], np.float64)
            scale = np.maximum(np.abs(x), np.abs(y))
            same = bool(np.all(np.abs(x - y)[..., :2] <= 1e-4 * scale[..., :1] + 1e-12) and
                        np.all(np.abs(x - y)[..., 2] <= 1e-4 * scale[..., 2] + 1e-12))
        if not same:
            raise IncompatibleCheckpointError(
                f"{where} holds LoRA adapters trained on another base model (base tensor {name} differs); set "
                "model.hf_path to the base the adapters were trained on")


def _short(error: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters (TensorStore messages are long)."""
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _say(line: str) -> None:
    print(line, flush=True)


class _AbandonedReads(logging.Filter):
    """Silences what the reads of a failed restore print as they fail later, into Orbax's closed event loop.

    Orbax stops at the first array that fails; the other reads still end, with "Event loop is closed" and
    "Task exception was never retrieved" tracebacks that look like a crash although the run goes on.
    """

    def __init__(self):
        super().__init__()
        self.paths: list[str] = []  # step directories that failed to restore
        self.dropped = 0
        self.installed = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        drop = text.startswith("Task exception was never retrieved") and any(p in text for p in self.paths)
        self.dropped += drop
        return not drop

    def _closed_loop(self, exc: BaseException | None, tb: Any) -> bool:
        """A callback from outside Python (TensorStore) into a closed loop: nothing of the program's own."""
        drop = (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and tb is not None
                and tb.tb_frame.f_code.co_name == "call_soon_threadsafe")
        self.dropped += drop
        return drop

    def install(self) -> None:
        """Filter asyncio's log, and `sys.excepthook` / `sys.unraisablehook` (which the late callbacks use)."""
        if self.installed:
            return
        self.installed = True
        logging.getLogger("asyncio").addFilter(self)
        excepthook, unraisablehook = sys.excepthook, sys.unraisablehook
        sys.excepthook = lambda kind, exc, tb: None if self._closed_loop(exc, tb) else excepthook(kind, exc, tb)
        sys.unraisablehook = lambda u: None if self._closed_loop(u.exc_value, u.exc_traceback) else unraisablehook(u)

    def drain(self, step_path: str, quiet_s: float = 0.3, limit_s: float = 3.0) -> None:
        """After a failed restore of `step_path`: wait (at most `limit_s`) until its reads have stopped failing."""
        self.paths.append(step_path.rstrip("/") + "/")
        deadline, last, since = time.monotonic() + limit_s, -1, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
            gc.collect()  # failed tasks report when collected
            if self.dropped != last:
                last, since = self.dropped, time.monotonic()
            time.sleep(0.05)


_ABANDONED = _AbandonedReads()


class Checkpointer:
    """Save every `every` steps (asynchronously), keep the last `keep`, restore the latest complete one."""

    def __init__(self, directory: str, every: int, keep: int = 3, async_save: bool = True):
        self.every = every
        self._identity: dict | None = None  # a LoRA run's adapter shapes and base checksums, computed once
        self._incompatible: IncompatibleCheckpointError | None = None
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """Start saving `state` and the iterator position at `step` (when due, or when forced)."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        saved, frozen = _saved_part(state)
        items = {"state": ocp.args.StandardSave(to_plain(saved)), "data": ocp.args.JsonSave(dict(data_state))}
        if frozen is not None:
            self._identity = self._identity or lora_identity(saved.params, frozen)
            items["base"] = ocp.args.JsonSave(self._identity)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """(state with the template's shardings, iterator position, step) of the latest or given checkpoint."""
        step = self.latest_step() if step is None else step
        template, frozen = _saved_part(state_template)
        where = f"the checkpoint of step {step} in {self.manager.directory}"
        lora_saved = (epath.Path(self.manager.directory) / str(step) / "base").exists()
        if lora_saved != (frozen is not None):
            raise IncompatibleCheckpointError(
                f"{where} holds LoRA adapters, and this run trains the whole model: set model.lora as the run that "
                "saved it did" if lora_saved else f"{where} holds full fine-tuning state, and this run sets "
                "model.lora: train the adapters in a new train.output_dir (on model.hf_path=<output_dir>/hf)")
        if frozen is not None:  # the adapters go back on the loaded base, which must be the one they were trained on
            self._identity = self._identity or lora_identity(template.params, frozen)
            saved = self.manager.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))["base"]
            check_identity(dict(saved), self._identity, where)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                to_plain(template))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
        log.info("restored checkpoint of step %d", step)
        state = from_plain(template, restored["state"])
        if frozen is not None:
            state = state._replace(params=join(state.params, frozen))
        return state, dict(restored["data"]), step

    def restore_latest_good(self, state_template: Any) -> tuple[Any, dict, int] | None:
        """`restore` of the newest step that restores (newer, damaged ones are moved aside); None without steps.

        Every process takes part in each attempt (restoring is collective) and they agree on its outcome, so
        all resume from the same step. Raises ResumeError when steps exist but none restores.
        """
        main = jax.process_index() == 0
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            return None
        _ABANDONED.install()
        failed: list[tuple[int, str]] = []
        for i, step in enumerate(steps):
            restored, error = self._try_restore(state_template, step)
            if not any_process(error is not None):
                if failed:
                    self._set_aside([s for s, _ in failed])
                return restored
            if any_process(self._incompatible is not None):  # every process stops, none moves anything aside
                raise self._incompatible or IncompatibleCheckpointError(
                    f"{self.manager.directory}: another process found the checkpoint of step {step} incompatible")
            failed.append((step, error or "it failed on another process"))
            if main or error:
                then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint is left"
                _say(f"warning: checkpoint of step {step} in {self.manager.directory} could not be restored "
                     f"({failed[-1][1]}); {then}")
        raise ResumeError(
            f"none of the checkpoints in {self.manager.directory} (steps {', '.join(map(str, sorted(steps)))}) "
            f"could be restored (step {steps[0]}: {failed[0][1]}); not starting over: repair or move them")

    def _try_restore(self, state_template: Any, step: int) -> tuple[tuple[Any, dict, int] | None, str | None]:
        """(`restore`'s result, None), or (None, a short reason) when the step does not restore here."""
        try:
            return self.restore(state_template, step), None
        except IncompatibleCheckpointError as e:  # a sound checkpoint of another kind of run: not tried further
            self._incompatible = e
            return None, str(e)
        except Exception as e:  # noqa: BLE001 - any failure to read a step means it cannot be resumed from
            _ABANDONED.drain(str(epath.Path(self.manager.directory) / str(step)))
            if jax.process_count() > 1:  # the barrier that ends Orbax's (0.12) restore, which the failure skipped
                ocp.multihost.sync_global_processes("Checkpointer:restore")
            return None, _short(e)

    def _set_aside(self, steps: list[int]) -> None:
        """Rename damaged step directories to `<step>.damaged-<time>` (kept, but out of the way of new saves)."""
        stamp, problem = time.strftime("%Y%m%d-%H%M%S"), ""
        if jax.process_index() == 0:  # the directory is shared: one process renames
            for step in steps:
                path = epath.Path(self.manager.directory) / str(step)
                target = path.parent / f"{step}.damaged-{stamp}"
                try:
                    path.rename(target)
                except OSError as e:
                    problem = f"could not move the damaged checkpoint {path} aside ({_short(e)}); move it by hand"
                    break
                _say(f"warning: moved the damaged checkpoint of step {step} to {target} (kept for inspection; "
                     f"this run saves step {step} anew)")
        if any_process(bool(problem)):  # also the barrier before every process lists the steps again
            raise ResumeError(problem or "process 0 could not move a damaged checkpoint aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
