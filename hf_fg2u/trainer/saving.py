"""Saving a bilevel run: staged, atomic checkpoints with the outer and inner state, resuming from them,
the model card and the Hub push."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from hf_fg2u.hub.model_card import WEIGHTED_DATASET_FILE, build_model_card, write_model_card
from hf_fg2u.lm.params import trainable_parameters, unwrap_model
from hf_fg2u.outer import OuterModule
from hf_fg2u.trainer.checkpointing import (
    INNER_STATES,
    PARTIAL_PREFIX,
    STATE_CONFIG_NAME,
    check_resume_compatible,
    compatibility_fields,
    load_bilevel_state,
    publish_checkpoint,
    publish_files,
    read_json,
    rotate_checkpoints_by_step,
    run_settings,
    save_bilevel_state,
    warn_changed_settings,
)
from hf_fg2u.trainer.model_setup import write_base_model_file

logger = logging.get_logger(__name__)


class SavingMixin:
    """Checkpoints, resuming, the model card and the Hub push of ``BilevelTrainer``."""

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """The Trainer's save (the peft adapter, tokenizer, args), then the outer variables, the inner
        optimizer state and a model card: a folder ready for the Hub and for exact resumption. A save outside a
        checkpoint is written into ``_partial-save/`` first and its files then moved in one by one (each
        replaced atomically), so a failure while writing leaves the previous save whole. Within a checkpoint a
        failure is kept for :meth:`_save_checkpoint`, which reports it to every process."""
        output_dir = Path(output_dir or self.args.output_dir)
        if self._staging is not None:  # a checkpoint: its whole folder is staged already
            try:
                self._write_save(output_dir, state_dict, final=Path(self._staging).parent / output_dir.name)
            except Exception as error:
                self._save_error = error
            return
        if not self.args.should_save:
            super()._save(str(output_dir), state_dict=state_dict)  # collectives of a sharded model, if any
            return
        staging = output_dir / f"{PARTIAL_PREFIX}save"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._write_save(staging, state_dict, final=output_dir)
            publish_files(staging, output_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _write_save(self, output_dir: Path, state_dict, final: Path) -> None:
        """Write the save into ``output_dir``; its model card names ``final``, where it will be moved."""
        args = self.args
        # The Trainer pickles its args, hub_token included, into a file that push_to_hub uploads: it gets the
        # redacted copy, so no unredacted training_args.bin is ever written.
        self.args = args.redacted()
        try:
            super()._save(str(output_dir), state_dict=state_dict)
        finally:
            self.args = args
        if not self.args.should_save:
            return
        self.outer.save_pretrained(output_dir)
        base_model = unwrap_model(self.model).get_base_model() if hasattr(self.model, "get_base_model") else None
        self.outer.save_peft_adapter(output_dir / "prompt_adapter", base_model or self.model, self.model_name)
        description = {
            **compatibility_fields(self.outer, self.args, self.model, self.train_dataset, self.meta_dataset),
            "settings": run_settings(self.args, self.model),
            "outer_config": self.outer.config_dict(),
        }
        description["reset_policy"] = self._resets.state_dict()
        states = (self._initial_params, self._initial_state, self._inner_state)
        save_bilevel_state(output_dir, dict(zip(INNER_STATES, states, strict=True)), description)
        write_base_model_file(output_dir, base_model or self.model, self.model_name)
        build_model_card(self, final).save(output_dir / "README.md")  # replaces peft's generic card

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into ``_partial-checkpoint-N/`` and renamed to ``checkpoint-N``
        when complete: a kill or a full disk mid-save leaves no ``checkpoint-N`` for a resume to pick. Whether
        every process wrote its part is agreed on before the rename, so a failure on one process (rank 0's
        write) raises on all instead of leaving the others waiting."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = os.path.join(run_dir, f"{PARTIAL_PREFIX}{name}")
        error = None
        try:
            super()._save_checkpoint(model, trial)  # its rotation sees only the staging folder
        except Exception as caught:
            error = caught
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(self._staging, ignore_errors=True)
            raise
        finally:
            staging, self._staging = self._staging, None
        error, self._save_error = error or self._save_error, None
        try:
            self.processes.agree(error, f"Saving {name}")  # also the barrier: every rank's files (RNG states) are in
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if self.args.should_save:
            final = publish_checkpoint(Path(staging) / name, Path(run_dir) / name)
            if self.state.best_global_step == self.state.global_step:
                self.state.best_model_checkpoint = str(final)
            rotate_checkpoints_by_step(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        directory = Path(resume_from_checkpoint)
        mine = compatibility_fields(self.outer, self.args, self.model, self.train_dataset, self.meta_dataset)
        check_resume_compatible(directory, mine)  # before the adapter's load, which fails on other shapes
        warn_changed_settings(directory, run_settings(self.args, self.model))
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = OuterModule.from_pretrained(directory)
        if loaded.config != self.outer.config:
            raise ValueError(
                f"Checkpoint {directory} holds outer variables {type(loaded).__name__}({loaded.config}) but this "
                f"trainer has {type(self.outer).__name__}({self.outer.config}). Resume with the same outer module."
            )
        self.outer.load_state_dict(loaded.state_dict())
        device = self.args.device
        inner = trainable_parameters(model or self.model)
        self._inner_params = {k: v.detach().clone().to(device) for k, v in inner.items()}
        states = load_bilevel_state(directory, device)
        self._initial_params, self._initial_state, self._inner_state = (states[k] for k in INNER_STATES)
        self._resets.load_state_dict(read_json(directory / STATE_CONFIG_NAME).get("reset_policy", {}))

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        """Write README.md: method, config, final metrics, versions, citation and tags (never a token)."""
        if not self.is_world_process_zero():
            return
        write_model_card(self, Path(self.args.output_dir), model_name=model_name, **kwargs)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token=None,
        revision: str | None = None,
        **kwargs,
    ):
        """The Trainer's push (adapter, outer variables, card: one commit), with the train dataset and its learned
        weights as ``weighted_dataset.parquet`` in that commit when the outer variables weight rows. The upload is
        one commit, so a failure leaves nothing partial on the Hub; it is re-raised saying where the run is saved
        and that calling push_to_hub again is enough."""
        if self.args.should_save and self.train_dataset is not None and self.outer.weighs_rows:
            self.export_weights().to_parquet(str(Path(self.args.output_dir) / WEIGHTED_DATASET_FILE))
        try:
            return super().push_to_hub(commit_message, blocking, token, revision, **kwargs)
        except Exception as error:  # HTTP, connection and timeout errors of huggingface_hub and its client
            raise RuntimeError(
                f"push_to_hub to {self.hub_model_id or self.args.hub_model_id!r} failed ({type(error).__name__}: "
                f"{error}). The run is saved in {self.args.output_dir}; the Hub holds no partial upload. Call "
                "trainer.push_to_hub() again once the Hub is reachable."
            ) from error
