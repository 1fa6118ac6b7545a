"""The trainer's checkpoints (a mixin of :class:`~cir_plugins.training.loop.Trainer`): writing ``last`` / ``best``,
resuming ``last``, loading a checkpoint's weights; the format is :mod:`cir_plugins.training.checkpoint`'s."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, explain
from . import checkpoint as ckpt
from .checkpoint import STATE_FILE, load_checkpoint
from .config import RESUMABLE_CHANGES

__all__ = ["Checkpointing"]

logger = logging.getLogger(__name__)


class Checkpointing:
    """Checkpoint methods of the trainer (rank 0 writes; ``{config.output_dir}/checkpoints/{last,best}``)."""

    def _checkpoint_root(self) -> Path | None:
        return Path(self.config.output_dir) / "checkpoints" if self.config.output_dir else None

    def _save(self, name: str) -> None:
        if (root := self._checkpoint_root()) is None or self.rank != 0:
            return
        state = {"stage": self.stage, "config": self.config.to_dict(), "trainable": [n for n, _ in self.trainable],
                 "epoch": self._epoch, "micro": self._micro, "global_step": self._global_step,
                 "epoch_stats": dict(self._epoch_stats), "history": self.history, "best": self._best,
                 "best_epoch": self.best_epoch, "rng": ckpt.capture_rng(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "fingerprints": self._data_fingerprints(), "made_with": self.made_with}
        ckpt.save_checkpoint(root, name, weights=self._named_state(), optimizer_state=self.optimizer.state_dict(),
                             state=state)

    def _data_fingerprints(self) -> dict[str, str | None]:
        """Hashes of the training triplets (in order) and of the bank (ids, rows, weights), computed once."""
        if getattr(self, "_fingerprints", None) is None:
            bank = getattr(self.negatives, "bank", None)
            self._fingerprints = {"triplets": ckpt.triplets_fingerprint(self.triplets),
                                  "bank": ckpt.bank_fingerprint(bank) if bank is not None else None}
        return self._fingerprints

    def _check_resume_position(self, state: dict[str, Any], path: Path, data_changed: bool) -> None:
        """CheckpointError unless the saved position is one this run reaches (else micro-batches are skipped)."""
        epoch, micro, step = state["epoch"], state["micro"], state["global_step"]
        plan, accum = len(self.sampler), self.config.grad_accum_steps
        expected_step = epoch * self._optimizer_steps_per_epoch() + micro // accum
        if micro >= plan or micro % accum or (not data_changed and step != expected_step):
            raise CheckpointError(explain(
                f"{path / STATE_FILE}: the saved training position is not one this run reaches",
                got=f"epoch {epoch}, micro-batch {micro}, optimiser step {step}",
                expected=f"a micro-batch in [0, {plan}) at a multiple of grad_accum_steps={accum}, and optimiser step "
                         f"{expected_step}",
                fix="resume with the same data and config, or restore the checkpoint folder from a copy"))

    def _resume(self, allow_data_change: bool = False) -> bool:
        if (root := self._checkpoint_root()) is None:
            raise ConfigError(explain("resume needs config.output_dir", got=None,
                                      fix="set output_dir to the folder of the run to continue"))
        try:
            checkpoint = load_checkpoint(root, "last", device=self.device)
        except CheckpointError:
            if not ckpt.has_checkpoint(root, "last"):
                logger.info("no checkpoint under %s: starting from scratch", root)
                return False
            raise
        state, now = checkpoint.state, self.config.to_dict()
        saved = dict(state["config"])
        differ = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if state.get("stage") != self.stage or differ:
            raise CheckpointError(explain("the checkpoint was written with another configuration",
                                          got={k: (saved.get(k), now.get(k)) for k in differ} or state.get("stage"),
                                          fix="resume with the same config (only epochs and checkpointing may change)"))
        names = [name for name, _ in self.trainable]
        if state["trainable"] != names:
            raise CheckpointError(explain("the checkpoint trains other parameters than this model",
                                          got=len(state["trainable"]), expected=len(names)))
        saved_prints, now_prints = state.get("fingerprints", {}), self._data_fingerprints()
        changed = sorted(k for k in now_prints if k in saved_prints and saved_prints[k] != now_prints[k])
        if changed and not allow_data_change:
            raise CheckpointError(explain(
                f"{checkpoint.path}: the checkpoint was trained on other data ({' and '.join(changed)} differ)",
                got={k: now_prints[k][:12] if now_prints[k] else None for k in changed},
                expected={k: saved_prints[k][:12] if saved_prints[k] else None for k in changed},
                fix="resume with the same triplets (same order) and bank, or pass fit(resume=True, "
                    "allow_data_change=True) to continue on the new data"))
        if changed:
            logger.warning("resuming %s on changed data (%s), as allowed", checkpoint.path, ", ".join(changed))
        self._check_resume_position(state, checkpoint.path, bool(changed))
        ckpt.restore_weights(checkpoint, self._named_parameters())
        ckpt.restore_optimizer(self.optimizer, checkpoint)
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self._epoch, self._micro, self._global_step = state["epoch"], state["micro"], state["global_step"]
        self._epoch_stats, self.history = dict(state["epoch_stats"]), list(state["history"])
        self._best, self.best_epoch = state["best"], state.get("best_epoch")
        ckpt.restore_rng(state["rng"], source=checkpoint.path / STATE_FILE)
        logger.info("resumed from %s at epoch %d, micro-batch %d", checkpoint.path, self._epoch + 1, self._micro)
        return True

    def load_weights(self, name: str = "best") -> None:
        """Load the trainable weights (and temperature) of checkpoint ``name`` into the model."""
        if (root := self._checkpoint_root()) is None:
            raise ConfigError(explain("no output_dir: there are no checkpoints", got=None))
        ckpt.restore_weights(load_checkpoint(root, name, device=self.device), self._named_parameters())
