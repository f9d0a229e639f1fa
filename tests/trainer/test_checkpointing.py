"""Checkpoint and save I/O: rotation by step, a replaced checkpoint kept until its successor is in place, the
final save staged (a failed write leaves the previous save whole) and never holding an unredacted token."""

import os
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import rotate_checkpoints

import hf_fg2u.trainer.checkpointing as checkpointing
import hf_fg2u.trainer.saving as saving_module
from hf_fg2u import ExampleWeights
from hf_fg2u.trainer.checkpointing import publish_checkpoint, publish_files, rotate_checkpoints_by_step
from tests.helpers.tiny import fact_data, trainer_for


def folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    (path / "file.txt").write_text(content)
    return path


def test_rotation_keeps_the_newest_step_whatever_the_modification_times(tmp_path):
    for run in ("by_mtime", "by_step"):
        for step in (9, 10):
            folder(tmp_path / run / f"checkpoint-{step}", str(step))
            os.utime(tmp_path / run / f"checkpoint-{step}", (1000 - step, 1000 - step))  # 10 looks older
    rotate_checkpoints(str(tmp_path / "by_mtime"), 1, None, use_mtime=True)  # what the trainer called before
    assert sorted(p.name for p in (tmp_path / "by_mtime").iterdir()) == ["checkpoint-9"]  # the newest was lost
    rotate_checkpoints_by_step(str(tmp_path / "by_step"), 1, None)
    assert sorted(p.name for p in (tmp_path / "by_step").iterdir()) == ["checkpoint-10"]


def test_a_replaced_checkpoint_survives_a_failed_rename(tmp_path, monkeypatch):
    final = folder(tmp_path / "run" / "checkpoint-2", "old")
    written = folder(tmp_path / "run" / "_partial-checkpoint-2" / "checkpoint-2", "new")
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(source) == written:
            raise OSError("rename failed (injected)")
        return real_replace(source, target)

    monkeypatch.setattr(checkpointing.os, "replace", failing_replace)
    with pytest.raises(OSError, match="injected"):
        publish_checkpoint(written, final)
    assert (final / "file.txt").read_text() == "old"
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    publish_checkpoint(written, final)
    assert (final / "file.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-2"]


def test_publish_files_replaces_files_and_folders_and_keeps_the_rest(tmp_path):
    final = folder(tmp_path / "out", "old")
    folder(final / "adapter", "old adapter")
    (final / "keep.txt").write_text("mine")
    staging = folder(tmp_path / "out" / "_partial-save", "new")
    folder(staging / "adapter", "new adapter")
    publish_files(staging, final)
    assert (final / "file.txt").read_text() == "new" and (final / "adapter" / "file.txt").read_text() == "new adapter"
    assert (final / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in final.iterdir()) == ["_partial-save", "adapter", "file.txt", "keep.txt"]


def test_final_save_is_staged_and_never_writes_the_token(tmp_path, monkeypatch):
    _, data = fact_data(num_facts=4, copies=4)
    trainer = trainer_for(tmp_path, ExampleWeights(len(data["train"])), data, max_steps=1, hub_token="hf_secret")
    saved_args = []
    real_save = torch.save

    def spy(obj, *args, **kwargs):
        if hasattr(obj, "hub_token"):
            saved_args.append(obj.hub_token)
        return real_save(obj, *args, **kwargs)

    monkeypatch.setattr(torch, "save", spy)
    out = tmp_path / "final"
    trainer.save_model(str(out))
    assert saved_args == [None]  # one training_args.bin, redacted from the start
    first = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "bilevel_state.json" in first and "training_args.bin" in first

    def failing(*args, **kwargs):
        raise OSError("No space left on device (injected)")

    trainer.outer.logits.data += 1.0  # a second save would change the files
    monkeypatch.setattr(saving_module, "save_bilevel_state", failing)
    with pytest.raises(OSError, match="injected"):
        trainer.save_model(str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == first  # the previous save, whole
    assert not any(p.name.startswith("_partial") for p in out.iterdir())
    assert torch.load(out / "training_args.bin", weights_only=False).hub_token is None


def test_outer_snapshot_reuses_its_buffers_and_holds_the_state_before_the_update(tmp_path):
    _, data = fact_data(num_facts=4, copies=4)
    trainer = trainer_for(tmp_path, ExampleWeights(len(data["train"])), data, max_steps=2, optim="adamw_torch")
    trainer.train()
    first = trainer._snapshot_outer()
    buffers = list(trainer._outer_buffers)
    live = trainer.optimizer.state_dict()["state"][0]["exp_avg"]
    expected = live.clone()
    live.add_(1.0)  # an update after the snapshot
    torch.testing.assert_close(first[1]["state"][0]["exp_avg"], expected, rtol=0, atol=0)
    second = trainer._snapshot_outer()
    assert all(a is b for a, b in zip(trainer._outer_buffers, buffers, strict=True) if torch.is_tensor(a))
    torch.testing.assert_close(second[1]["state"][0]["exp_avg"], expected + 1.0, rtol=0, atol=0)


def test_the_meta_rows_groups_are_not_part_of_the_data_fingerprint():
    """meta_group is there only while project_group_shift is on, a setting a resume may change; the rows are the
    same rows."""
    from datasets import Dataset

    from hf_fg2u.trainer.checkpointing import data_fingerprint

    meta = Dataset.from_dict({"input_ids": [[1, 2], [3, 4, 5]], "attention_mask": [[1, 1], [1, 1, 1]]})
    assert data_fingerprint(meta.add_column("meta_group", [0, 1])) == data_fingerprint(meta)
    assert data_fingerprint(meta.select([1, 0])) != data_fingerprint(meta)
