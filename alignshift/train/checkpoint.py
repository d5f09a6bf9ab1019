"""Orbax checkpointing of a train state plus JSON metadata.

What a checkpoint holds (``<dir>/<step>/``):

* ``state`` — the train state pytree: ``params``, ``opt_state`` (Adam moments, schedule count,
  the non-finite guard's counters) and the ``step`` counter; any other entry a caller puts in
  the state (e.g. a PRNG key for a stochastic step) is saved with it;
* ``meta`` (JSON) — what :func:`alignshift.train.loop.train_loop` needs to continue exactly:
  the loop step, the data-iterator position(s) with their seed / batch size / data size (the
  data order RNG is ``(seed, epoch)``, so seed + position is the whole data RNG state), the
  fault counters, and the metrics of steps not yet logged.

Saving is atomic: orbax writes into a temporary ``<step>.orbax-checkpoint-tmp-*`` directory
and renames it to ``<step>`` only when everything is written (its commit protocol); a process
killed during a save leaves the previous checkpoint as the latest one (tested with SIGKILL in
``tests/test_checkpoint_kill.py``). Leftover temporary directories are removed the next time a
:class:`Checkpointer` opens the directory.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into the given state (names directory and step)."""


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True),
        )

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Save and wait until the checkpoint is committed (renamed into place)."""
        self._mgr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )
        self._mgr.wait_until_finished()

    def restore(self, state_like, step: int | None = None):
        """Restore ``(state, meta)``; ``state_like`` gives structure, shapes, dtypes and shardings.

        Raises :class:`CheckpointError` naming the directory and step when the checkpoint does
        not fit ``state_like`` (e.g. it was written with another model or optimizer config).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_like)
        try:
            out = self._mgr.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            )
        except FileNotFoundError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory} step {step} does not match the train state being restored "
                f"(different model, optimizer or config?): {type(e).__name__}: {e}"
            ) from e
        return out["state"], out["meta"]

    def close(self) -> None:
        self._mgr.close()
