"""Hostile or careless runs: nothing secret written, nothing lost, no silent wrong run (issue 13)."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

import hf_fg2u.trainer.bilevel as trainer_module
import hf_fg2u.trainer.saving as saving_module
from hf_fg2u import BilevelTrainer, ExampleWeights
from hf_fg2u.hypergrad import NonFiniteHypergradientError
from hf_fg2u.lm.params import trainable_parameters
from hf_fg2u.trainer.run_folder import LOCK_NAME
from tests.helpers.tiny import LORA_TARGETS, TOKENIZER, config, fact_data, tiny_llama, trainer_for

SECRET = "hf_" + "Zq7" * 10
FAST = dict(num_directions=2, per_device_train_batch_size=4, meta_batch_size=4, logging_steps=1)


@pytest.fixture(scope="module")
def data():
    return fact_data(num_facts=8, copies=2)[1]


def fast_trainer(tmp_path, data, outer=None, **overrides):
    return trainer_for(tmp_path, outer or ExampleWeights(16), data, **{**FAST, **overrides})


def failing_estimate(fail_on: dict[int, BaseException]):
    """estimate_hypergradient that raises ``fail_on[k]`` on its k-th call (0-based) and works otherwise."""
    real, calls = trainer_module.estimate_hypergradient, []

    def estimate(*args, **kwargs):
        calls.append(1)
        if len(calls) - 1 in fail_on:
            raise fail_on[len(calls) - 1]
        return real(*args, **kwargs)

    return estimate


# -- case 1: credentials ---------------------------------------------------------------------------------------
def test_no_credential_in_any_written_file(tmp_path, data):
    trainer = fast_trainer(tmp_path, data, max_steps=2, save_strategy="steps", save_steps=1, hub_token=SECRET + "h",
                           model_init_kwargs={"token": SECRET, "nested": {"api_key": "k-" + SECRET}})  # fmt: skip
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"bilevel_state.json", "training_args.bin", "README.md"} <= {p.name for p in written}
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []
    saved = json.loads((tmp_path / "run" / "bilevel_state.json").read_text())["settings"]
    assert saved["model_init_kwargs"] == {"token": "<redacted>", "nested": {"api_key": "<redacted>"}}
    assert trainer.args.model_init_kwargs["token"] == SECRET  # the run itself keeps it


def test_no_credential_in_the_args_a_checkpoint_push_writes(hub, tmp_path, data, monkeypatch):
    """Issue 36 (found beside case 4): with push_to_hub and checkpoints, the Trainer's checkpoint push re-saved the
    args, hub_token in clear, as output_dir/training_args.bin and uploaded it in each intermediate commit (the
    final save then replaced it, so the repo's last state looked clean)."""
    import transformers.trainer

    pickled, save = [], torch.save

    def recording_save(obj, path, *args, **kwargs):
        save(obj, path, *args, **kwargs)
        if str(path).endswith("training_args.bin"):
            pickled.append(Path(path).read_bytes())

    monkeypatch.setattr(transformers.trainer.torch, "save", recording_save)
    trainer = fast_trainer(tmp_path, data, max_steps=2, save_strategy="steps", save_steps=1, push_to_hub=True,
                           hub_model_id="tester/pushed", hub_token="hf_fake")  # fmt: skip
    trainer.train()
    assert len(pickled) >= 4 and [data for data in pickled if b"hf_fake" in data] == []  # 2 checkpoints, 2 pushes
    assert trainer.args.hub_token == "hf_fake"  # the run keeps it: the pushes authenticated with it


# -- case 2: output_dir of something else, unwritable, a file ---------------------------------------------------------
def test_output_dir_of_something_else_is_refused_and_left_alone(tmp_path, data):
    victim = tmp_path / "run"
    victim.mkdir()
    (victim / "README.md").write_text("my notes")
    (victim / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="is not empty and holds no hf_fg2u run.*--overwrite_output_dir"):
        fast_trainer(tmp_path, data)
    assert (victim / "README.md").read_text() == "my notes" and sorted(os.listdir(victim)) == [
        "README.md",
        "results.json",
    ]
    fast_trainer(tmp_path, data, overwrite_output_dir=True)  # told to: accepted


def test_output_dir_that_is_a_file_or_unwritable_is_refused_at_start(tmp_path, data):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        fast_trainer(tmp_path, data)
    if os.access("/proc", os.W_OK) and not os.path.exists("/proc/self"):
        pytest.skip("no read-only /proc here")
    with pytest.raises(ValueError, match="/proc/hf_fg2u_run.*is not writable"):
        trainer_for(tmp_path, ExampleWeights(16), data, output_dir="/proc/hf_fg2u_run", **FAST)


# -- case 3: φ checked after the outer update ------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_outer_update_that_overflows_is_undone(tmp_path, data, policy):
    """An outer optimizer whose step overflows (here SGD with an infinite learning rate, which torch accepts): φ, θ
    (in the model too) and the inner optimizer state are as before the step (issue 36: θ stayed advanced)."""
    outer = ExampleWeights(16)
    trainer = BilevelTrainer(
        tiny_llama(), config(tmp_path, max_steps=3, nonfinite_policy=policy, inner_reset_every=2, **FAST),
        train_dataset=data["train"], meta_dataset=data["meta"], outer=outer,
        peft_config=LoraConfig(r=8, target_modules=LORA_TARGETS),
        optimizers=(torch.optim.SGD(outer.parameters(), lr=float("inf")), None),
    )  # fmt: skip
    theta = trainable_parameters(trainer.model)
    if policy == "stop":
        with pytest.raises(NonFiniteHypergradientError, match=r"outer update made \['logits'\] non-finite"):
            trainer.train()
    else:
        restored = r"Outer step 0 skipped.*non-finite.*φ, θ and the inner optimizer state were restored. Lower"
        with pytest.warns(UserWarning, match=restored), pytest.raises(RuntimeError, match="All 3 outer steps"):
            trainer.train()
        assert trainer.state.log_history[-1]["skipped_steps"] == 3.0
    assert torch.equal(outer.logits.detach(), torch.zeros(16))
    for name, value in trainable_parameters(trainer.model).items():
        assert torch.equal(value, theta[name]) and torch.equal(trainer._inner_params[name], theta[name]), name
    assert trainer._inner_state is None  # no inner step kept: a fresh Adam state
    assert trainer._resets.steps_since_reset == 0  # no step counted towards inner_reset_every


# -- case 9: skipped steps in the logs and the card -------------------------------------------------------------------
def test_skipped_steps_are_counted_and_left_out_of_the_loss(tmp_path, data, monkeypatch):
    nonfinite = NonFiniteHypergradientError("loss is nan")
    monkeypatch.setattr(trainer_module, "estimate_hypergradient", failing_estimate({1: nonfinite}))
    trainer = fast_trainer(tmp_path, data, max_steps=3, logging_steps=3)
    with pytest.warns(UserWarning, match="Outer step 1 skipped"):
        trainer.train()
    window, summary = trainer.state.log_history[0], trainer.state.log_history[-1]
    assert window["skipped_steps"] == 1.0 and window["loss"] == pytest.approx(window["meta_loss"])
    assert window["loss"] > 0.5  # the mean of the 2 steps that ran (the Trainer counted the skipped one as 0)
    assert (summary["skipped_steps"], summary["outer_steps_run"]) == (1.0, 2.0)
    assert summary["train_loss"] == pytest.approx(window["meta_loss"], rel=1e-6)
    trainer.create_model_card()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "| skipped_steps | 1 |" in card and "| outer_steps_run | 2 |" in card


def test_a_run_whose_every_step_was_skipped_fails(tmp_path, data, monkeypatch):
    nonfinite = NonFiniteHypergradientError("loss is nan")
    monkeypatch.setattr(trainer_module, "estimate_hypergradient", failing_estimate(dict.fromkeys(range(3), nonfinite)))
    trainer = fast_trainer(tmp_path, data, max_steps=3)
    with pytest.warns(UserWarning, match="skipped"), pytest.raises(RuntimeError, match="All 3 outer steps were skip"):
        trainer.train()
    assert all("loss" not in entry for entry in trainer.state.log_history)  # never "loss 0.0"


# -- checkpoints: atomic, verified before resume, compatible ---------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data):
    """checkpoint-1 and checkpoint-2 of a 2-step run."""
    root = tmp_path_factory.mktemp("saved")
    fast_trainer(root, data, max_steps=2, save_strategy="steps", save_steps=1).train()
    return root / "run"


def copy_run(checkpoint, tmp_path):
    shutil.copytree(checkpoint, tmp_path / "run")
    return tmp_path / "run"


def test_disk_full_during_a_save_leaves_no_partial_checkpoint(tmp_path, data, monkeypatch):
    real, calls = saving_module.save_bilevel_state, []

    def save(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(saving_module, "save_bilevel_state", save)
    with pytest.raises(OSError, match="No space left"):
        fast_trainer(tmp_path, data, max_steps=3, save_strategy="steps", save_steps=1).train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-1"]  # no checkpoint-2, no partial one, no lock
    monkeypatch.undo()
    resumed = fast_trainer(tmp_path, data, max_steps=3, save_strategy="no")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3


def test_resume_never_picks_a_partial_checkpoint(tmp_path, data, checkpoint):
    run = copy_run(checkpoint, tmp_path)
    shutil.copytree(run / "checkpoint-2", run / "_partial-checkpoint-3" / "checkpoint-3")
    (run / "_partial-checkpoint-3" / "checkpoint-3" / "trainer_state.json").write_text('{"glo')  # killed mid-save
    trainer = fast_trainer(tmp_path, data, max_steps=3)
    trainer.train(resume_from_checkpoint=True)  # picks checkpoint-2
    assert trainer.state.global_step == 3 and len(trainer.state.log_history) == 2 + 2  # 2 restored + step 3 + summary
    shutil.copytree(run / "checkpoint-2", run / "checkpoint-4")  # a partial folder from an older version
    (run / "checkpoint-4" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-4/trainer_state.json.*resume from an earlier checkpoint"):
        fast_trainer(tmp_path, data, max_steps=5).train(resume_from_checkpoint=True)


def test_save_total_limit_still_rotates_checkpoints(tmp_path, data):
    fast_trainer(tmp_path, data, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=1).train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-3"]


@pytest.mark.parametrize(
    "name, damage",
    [
        ("adapter_model.safetensors", "truncate"),
        ("optimizer.pt", "truncate"),
        ("trainer_state.json", "truncate"),
        ("outer_model.safetensors", "truncate"),
        ("bilevel_state.json", "truncate"),
        ("outer_model.safetensors", "nan"),
    ],
)
def test_damaged_checkpoint_file_is_named(tmp_path, data, checkpoint, name, damage):
    path = copy_run(checkpoint, tmp_path) / "checkpoint-2" / name
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        message = f"Could not read .*checkpoint-2/{name}.*resume from an earlier checkpoint"
    else:
        from safetensors.torch import load_file, save_file

        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(path).items()}, path)
        message = f"checkpoint-2/{name} holds NaN or inf.*resume from an earlier checkpoint"
    with pytest.raises(ValueError, match=message):
        fast_trainer(tmp_path, data, max_steps=3).train(resume_from_checkpoint=True)


SHAPES = r"inner_parameter_shapes: \d+ differ, e.g. .*lora_A.*: checkpoint \[8, 64\] vs now \[4, 64\]"


def test_resume_checks_lora_shapes_and_data(tmp_path, data, checkpoint):
    copy_run(checkpoint, tmp_path)
    other_rank = BilevelTrainer(
        tiny_llama(), config(tmp_path, max_steps=3, **FAST), train_dataset=data["train"], meta_dataset=data["meta"],
        outer=ExampleWeights(16), peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS),
        processing_class=TOKENIZER,
    )  # fmt: skip
    with pytest.raises(ValueError, match=SHAPES):
        other_rank.train(resume_from_checkpoint=True)
    changed = {**data, "train": data["train"].map(lambda row: {"input_ids": row["input_ids"][::-1]})}
    with pytest.raises(ValueError, match=r"incompatible config \(train_data: checkpoint '16 rows, sha256"):
        fast_trainer(tmp_path, changed, max_steps=3).train(resume_from_checkpoint=True)


def test_resume_from_nothing_says_so(tmp_path, data):
    trainer = fast_trainer(tmp_path, data, max_steps=1)
    with pytest.raises(ValueError, match="No checkpoint-N folder to resume from"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="checkpoint-9 does not exist"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-9"))


# -- two runs, Ctrl-C -----------------------------------------------------------------------------------------------
def test_two_runs_in_one_output_dir(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with pytest.raises(ValueError, match=f"Another run \\(process {os.getpid()}.*is writing to"):
        fast_trainer(tmp_path, data, max_steps=1).train()
    # A pid no process can hold (above every kernel's pid_max; a finished child's pid could be reused meanwhile).
    never = 2**31 - 1
    (run / LOCK_NAME).write_text(json.dumps({"pid": never, "host": os.uname().nodename}))
    with pytest.warns(UserWarning, match="Taking over .*no longer running"):
        fast_trainer(tmp_path, data, max_steps=1).train()
    assert not (run / LOCK_NAME).exists()


def test_ctrl_c_during_an_outer_step_loses_nothing(tmp_path, data, monkeypatch):
    monkeypatch.setattr(trainer_module, "estimate_hypergradient", failing_estimate({1: KeyboardInterrupt()}))
    outer = ExampleWeights(16)
    trainer = fast_trainer(tmp_path, data, outer, max_steps=3, save_strategy="steps", save_steps=1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    run = tmp_path / "run"
    assert sorted(os.listdir(run)) == ["checkpoint-1"]  # the lock is released, checkpoint-1 complete
    saved = saving_module.OuterModule.from_pretrained(run / "checkpoint-1")
    torch.testing.assert_close(outer.logits, saved.logits, rtol=0, atol=0)  # φ not half-updated
    monkeypatch.undo()
    resumed = fast_trainer(tmp_path, data, max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3


def test_a_new_run_into_an_interrupted_runs_folder_is_refused_and_overwrite_deletes_its_checkpoints(
    tmp_path, data, monkeypatch
):
    """Issue 36 case 3: a new run (resume forgotten) into a killed run's folder replaced its checkpoint-1 and kept
    its checkpoint-2, so --resume_from_checkpoint true would have continued the killed run."""
    monkeypatch.setattr(trainer_module, "estimate_hypergradient", failing_estimate({2: KeyboardInterrupt()}))
    run, steps = tmp_path / "run", dict(save_strategy="steps", save_steps=1)
    with pytest.raises(KeyboardInterrupt):
        fast_trainer(tmp_path, data, max_steps=4, **steps).train()
    monkeypatch.undo()
    assert sorted(os.listdir(run)) == ["checkpoint-1", "checkpoint-2"]
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    refused = r"holds checkpoints of a run that did not finish \(checkpoint-2 is the latest\).*--resume_from_checkpoint"
    with pytest.raises(ValueError, match=refused + r" true.*--overwrite_output_dir true.*another output_dir"):
        fast_trainer(tmp_path, data, max_steps=1, learning_rate=0.5, **steps).train()
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before  # nothing written
    outer = ExampleWeights(16)
    fast_trainer(tmp_path, data, outer, max_steps=1, learning_rate=0.5, overwrite_output_dir=True, **steps).train()
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-1"]  # the old checkpoint-2 is gone
    saved = saving_module.OuterModule.from_pretrained(run / "checkpoint-1")
    torch.testing.assert_close(outer.logits, saved.logits, rtol=0, atol=0)  # the new run's, not the old one's


def test_hub_push_that_fails_half_way_can_be_retried(hub, tmp_path, data, monkeypatch):
    from tests.helpers.fake_hub import _Reply

    trainer = fast_trainer(tmp_path, data, max_steps=1, push_to_hub=True, hub_model_id="tester/weights",
                           hub_token="hf_fake", hub_strategy="end")  # fmt: skip
    trainer.train()

    def commit_fails(*args):
        raise _Reply(500, "Internal Error", "InternalError")

    monkeypatch.setattr(hub, "_commit", commit_fails)
    with pytest.raises(RuntimeError, match=r"(?s)push_to_hub to 'tester/weights' failed .*saved in .*run.*again"):
        trainer.push_to_hub()
    assert hub.repos["tester/weights"] == {}  # nothing partial
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    monkeypatch.undo()
    hub.patch_endpoint(monkeypatch)
    trainer.push_to_hub()
    assert {"adapter_model.safetensors", "outer_model.safetensors", "README.md"} <= set(hub.repos["tester/weights"])
    assert LOCK_NAME not in hub.repos["tester/weights"]


def test_regularizer_gradient_that_overflows_skips_the_step(tmp_path, data):
    outer = ExampleWeights(16)
    outer.regularizer = lambda phi, kind: (phi["logits"] * float("inf")).sum()  # a penalty past float range
    trainer = fast_trainer(tmp_path, data, outer, max_steps=2, weight_regularization="l2",
                           weight_regularization_coef=1.0)  # fmt: skip
    overflow = r"gradient of \['logits'\] is not finite after adding weight_regularization='l2' × 1; lower the"
    with pytest.warns(UserWarning, match=overflow), pytest.raises(RuntimeError, match="All 2 outer steps"):
        trainer.train()
    assert torch.equal(outer.logits.detach(), torch.zeros(16))


def test_a_folder_without_bilevel_state_is_not_a_checkpoint(tmp_path, data, checkpoint):
    run = copy_run(checkpoint, tmp_path)
    (run / "checkpoint-2" / "bilevel_state.json").unlink()
    with pytest.raises(ValueError, match="checkpoint-2 is not a BilevelTrainer checkpoint: bilevel_state.json is"):
        fast_trainer(tmp_path, data, max_steps=3).train(resume_from_checkpoint=True)


def test_resuming_with_changed_settings_names_them_and_another_data_position_is_refused(tmp_path, data):
    """Issue 25: another inner_lr or lora scaling was accepted silently; another unroll or batch size would resume
    at another data position."""
    fast_trainer(tmp_path, data, max_steps=2, save_strategy="steps", save_steps=1).train()
    checkpoint = str(tmp_path / "run" / "checkpoint-1")
    with pytest.warns(UserWarning, match=r"changed settings \(inner_lr 0.01 -> 0.02\): the run goes on"):
        fast_trainer(tmp_path, data, max_steps=2, inner_lr=0.02).train(resume_from_checkpoint=checkpoint)
    with pytest.raises(ValueError, match=r"incompatible config \(rows_per_outer_step: .*unroll_steps"):
        fast_trainer(tmp_path, data, max_steps=2, unroll_steps=1).train(resume_from_checkpoint=checkpoint)


def test_resuming_a_checkpoint_past_max_steps_is_refused_and_one_at_it_warned_about(tmp_path, data, checkpoint):
    """Round 3 K04: a checkpoint at step 1000 with max_steps 4 trained nothing, and the results said 1000 steps."""
    copy_run(checkpoint, tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint-2 is at outer step 2, past max_steps=1.*--max_steps above 2"):
        fast_trainer(tmp_path, data, max_steps=1).train(resume_from_checkpoint=True)
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    with pytest.warns(UserWarning, match=r"checkpoint-2 is at outer step 2 = max_steps: no outer step is left"):
        fast_trainer(tmp_path, data, max_steps=2, save_strategy="no").train(resume_from_checkpoint=True)


def test_a_run_whose_hypergradient_is_always_zero_is_warned_about(tmp_path, data, monkeypatch):
    """Round 3 C66/C71: an inner_lr that diverges or lora_alpha 0 gave a hypergradient of 0 at every step, and the
    run ended as done with φ untouched."""
    monkeypatch.setattr(trainer_module.BilevelTrainer, "_record", zero_norm_record(trainer_module.BilevelTrainer))
    with pytest.warns(UserWarning, match=r"hypergradient was exactly 0 at every one of the 2 outer steps.*inner_lr"):
        fast_trainer(tmp_path, data, max_steps=2, save_strategy="no").train()


def zero_norm_record(cls):
    real = cls._record

    def record(self, result, method, step, seconds, grad_norm):
        real(self, result, method, step, seconds, 0.0)

    return record


def test_credentials_under_other_key_names_and_in_signed_urls_are_redacted():
    """Round 3 b2: passwd, pwd, auth_header, http_headers, bearer and a signed URL's ?sig= were written in clear to
    the card, bilevel_state.json and training_args.bin (all of which go through redact)."""
    from hf_fg2u.trainer.redaction import REDACTED, redact

    kwargs = {
        "passwd": "P1", "pwd": "P2", "auth_header": "P3", "http_headers": {"X-Api": "P4"}, "bearer": "P5",
        "cache_url": "https://acct.blob.core.windows.net/c/f?sv=2022&sig=P6", "nested": [{"db_password": "P7"}],
        "s3": "https://b.s3.amazonaws.com/f?X-Amz-Signature=P8", "author": "kept", "directions_per_pass": "kept",
        "url": "https://example.com/data?page=2",
    }  # fmt: skip
    clean = redact(kwargs)
    assert not [secret for secret in (f"P{i}" for i in range(1, 9)) if secret in json.dumps(clean)]
    assert clean["http_headers"] == REDACTED and clean["nested"] == [{"db_password": REDACTED}]
    assert (clean["author"], clean["directions_per_pass"], clean["url"]) == ("kept", "kept", kwargs["url"])
