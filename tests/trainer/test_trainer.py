"""BilevelTrainer end to end on tiny models built from config, with offline synthetic data."""

import json
import math
import warnings

import pytest
import torch
from datasets import DatasetDict, concatenate_datasets
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch.utils._pytree import tree_leaves

from hf_fg2u import BilevelTrainer, DomainWeights, ExampleWeights, OuterModule, SoftPrompt, WeightNet
from hf_fg2u.hypergrad import NonFiniteHypergradientError
from hf_fg2u.lm.evaluation import auroc
from hf_fg2u.lm.toy_data import make_fact_splits
from tests.helpers.tiny import TOKENIZER, config, fact_data, tiny_llama, tokenized, trainer_for


@pytest.fixture(scope="module")
def trained_example_weights(tmp_path_factory):
    """One bilevel run and its uniform-weights twin (learning_rate=0: the same budget, weights frozen)."""
    tmp_path = tmp_path_factory.mktemp("example_weights")
    splits, data = fact_data()
    runs = {}
    for name, lr in (("bilevel", 0.5), ("uniform", 0.0)):
        trainer = trainer_for(tmp_path / name, ExampleWeights(len(data["train"])), data, learning_rate=lr)
        trainer.train()
        runs[name] = (trainer, trainer.evaluate()["eval_loss"])
    return splits, data, runs


def test_example_weights_find_the_corrupted_rows_and_lower_the_meta_loss(trained_example_weights):
    splits, _, runs = trained_example_weights
    trainer, meta_loss = runs["bilevel"]
    corrupted = torch.tensor(splits["train"]["is_corrupted"])
    score = auroc(-trainer.outer.weights(), corrupted)
    assert score >= 0.9, score
    assert meta_loss < runs["uniform"][1], (meta_loss, runs["uniform"][1])
    logged = [entry for entry in trainer.state.log_history if "meta_loss" in entry]
    assert logged and {"hypergrad_norm", "inner_loss", "weight_entropy", "directions_per_second"} <= set(logged[-1])
    assert logged[-1]["weight_entropy"] < 1.0


def test_export_weights_adds_a_weight_column_with_mean_one(trained_example_weights):
    splits, _, runs = trained_example_weights
    trainer = runs["bilevel"][0]
    exported = trainer.export_weights()
    weights = torch.tensor(exported["weight"])
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(weights, trainer.outer.weights()[torch.tensor(exported["example_id"])])
    assert auroc(-weights, torch.tensor(splits["train"]["is_corrupted"])) >= 0.9


def test_export_flags_the_rows_that_never_entered_an_unroll(tmp_path):
    """2 outer steps of 2 inner batches of 8 rows score 32 of 64 rows: those are flagged scored, the other 32 keep the
    starting weight and are flagged, and the record survives a save and a load (a file from before it: all scored)."""
    _, data = fact_data()
    trainer = trainer_for(tmp_path, ExampleWeights(len(data["train"])), data, max_steps=2, num_directions=2)
    seen = set()
    for step, batch in enumerate(trainer.get_train_dataloader()):
        seen |= set(batch["example_id"].tolist()) if step < 2 else set()
    trainer.train()
    exported = trainer.export_weights()
    scored = dict(zip(exported["example_id"], exported["scored"], strict=True))
    assert {row for row, flag in scored.items() if flag} == seen and len(seen) == 32
    assert exported.column_names[-2:] == ["scored", "weight"]
    logits = trainer.outer.logits.detach()
    assert bool((logits[~trainer.outer.scored] == 0.0).all()) and bool((logits[trainer.outer.scored] != 0.0).any())
    trainer.outer.save_pretrained(tmp_path / "outer")
    assert torch.equal(OuterModule.from_pretrained(tmp_path / "outer").scored, trainer.outer.scored)
    state = load_file(str(tmp_path / "outer" / "outer_model.safetensors"))
    save_file({"logits": state["logits"]}, str(tmp_path / "outer" / "outer_model.safetensors"))  # an older file
    assert bool(OuterModule.from_pretrained(tmp_path / "outer").scored.all())


def test_saved_folder_loads_back_and_reproduces_the_metrics(trained_example_weights, tmp_path):
    _, data, runs = trained_example_weights
    trainer, meta_loss = runs["bilevel"]
    folder = tmp_path / "saved"
    trainer.save_model(str(folder))
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "outer_config.json", "outer_model.safetensors"} <= names
    card = (folder / "README.md").read_text()
    assert "2406.14095" in card and "fg2u" in card and "eval_loss" in card
    outer = OuterModule.from_pretrained(folder)
    torch.testing.assert_close(outer.logits, trainer.outer.logits.detach())
    model = PeftModel.from_pretrained(tiny_llama(), str(folder), is_trainable=True)
    reloaded = BilevelTrainer(model, config(tmp_path / "reload"), train_dataset=data["train"],
                              meta_dataset=data["meta"], eval_dataset=data["eval"], outer=outer)  # fmt: skip
    assert reloaded.evaluate()["eval_loss"] == pytest.approx(meta_loss, rel=1e-5)


def two_domain_data(seed=0):
    """Two fact tables: "target" (the meta facts) and "other" (unrelated facts)."""
    target = make_fact_splits(12, 4, seed=seed, corrupted_fraction=0.0)
    other = make_fact_splits(12, 4, seed=seed + 1, corrupted_fraction=0.0)
    train = concatenate_datasets(
        [target["train"], other["train"].map(lambda row: {"domain": "other", "example_id": row["example_id"] + 48})]
    ).map(lambda row: {"domain": "target" if row["example_id"] < 48 else "other"})
    splits = DatasetDict({"train": train, "meta": target["meta"], "eval": target["eval"]})
    return tokenized(splits)


def test_domain_weights_move_mass_to_the_meta_domain(tmp_path):
    data = two_domain_data()
    outer = DomainWeights(["target", "other"])
    trainer = trainer_for(tmp_path, outer, data, max_steps=24, num_directions=2, directions="basis")
    trainer.train()
    probabilities = outer.probabilities()
    assert probabilities["target"] > 0.6, probabilities
    logged = [e for e in trainer.state.log_history if "domain_weight/target" in e]
    assert logged and logged[-1]["domain_weight/target"] > 0.5


def test_soft_prompt_lowers_the_meta_loss(tmp_path):
    _, data = fact_data(corrupted_fraction=0.0)
    results = {}
    for name, lr in (("learned", 0.05), ("frozen", 0.0)):
        torch.manual_seed(0)
        prompt = SoftPrompt(4, 32, init_std=0.5)
        trainer = trainer_for(tmp_path / name, prompt, data, max_steps=16, learning_rate=lr, num_directions=16,
                              directions="rademacher", optim="sgd")  # fmt: skip
        trainer.train()
        results[name] = trainer.evaluate()["eval_loss"]
    assert results["learned"] < results["frozen"], results


def test_weight_net_separates_corrupted_from_clean(tmp_path):
    splits, data = fact_data()
    torch.manual_seed(0)
    outer = WeightNet(hidden_size=8)
    trainer = trainer_for(tmp_path, outer, data, num_directions=16, directions="gaussian", learning_rate=0.05)
    trainer.train()
    weights = torch.tensor(trainer.export_weights()["weight"])
    assert torch.isfinite(weights).all()
    assert auroc(-weights, torch.tensor(splits["train"]["is_corrupted"])) >= 0.8


def test_resume_continues_exactly(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, inner_optimizer="adam", num_directions=4,
                  logging_steps=1, directions="rademacher")  # fmt: skip
    straight = trainer_for(tmp_path / "straight", ExampleWeights(32), data, **common)
    straight.train()
    first = trainer_for(tmp_path / "resumed", ExampleWeights(32), data, **{**common, "max_steps": 3})
    first.train()
    checkpoint = tmp_path / "resumed" / "run" / "checkpoint-3"
    assert (checkpoint / "bilevel_state.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    second = trainer_for(tmp_path / "resumed", ExampleWeights(32), data, **common)
    second.train(resume_from_checkpoint=str(checkpoint))
    # "Continues exactly" (README), bitwise (issue 26 item 2): φ, θ, the inner and outer optimizer states, and
    # the logged numbers of the steps after the checkpoint.
    assert torch.equal(second.outer.logits, straight.outer.logits)
    for name, value in second._inner_params.items():
        assert torch.equal(value, straight._inner_params[name]), name
    for name, value in second._inner_state.items():
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(value), tree_leaves(straight._inner_state[name]),
                                                      strict=True)), name  # fmt: skip
    outer_states = [trainer.optimizer.state_dict()["state"] for trainer in (second, straight)]
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(outer_states[0]), tree_leaves(outer_states[1]),
                                                  strict=True))  # fmt: skip

    def logged(trainer):
        timing = ("seconds", "per_second", "runtime")
        after = [entry for entry in trainer.state.log_history if entry.get("step", 0) > 3 and "meta_loss" in entry]
        return [{k: v for k, v in entry.items() if not any(t in k for t in timing)} for entry in after]

    assert logged(second) == logged(straight) and len(logged(second)) == 3


def test_resume_refuses_an_incompatible_or_corrupt_checkpoint(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    common = dict(max_steps=2, save_strategy="steps", save_steps=2, num_directions=2)
    trainer_for(tmp_path, ExampleWeights(32), data, **common).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    other = trainer_for(tmp_path / "other", ExampleWeights(32), data, **{**common, "inner_optimizer": "sgd"})
    with pytest.raises(ValueError, match="incompatible config.*inner_optimizer"):
        other.train(resume_from_checkpoint=str(checkpoint))
    wider = trainer_for(tmp_path / "wider", ExampleWeights(40), data, **common)
    with pytest.raises(ValueError, match="Resume with the same outer module"):
        wider.train(resume_from_checkpoint=str(checkpoint))
    (checkpoint / "bilevel_state.safetensors").write_bytes(b"not a safetensors file")
    same = trainer_for(tmp_path / "same", ExampleWeights(32), data, **common)
    with pytest.raises(ValueError, match="corrupt"):
        same.train(resume_from_checkpoint=str(checkpoint))


def test_two_phase_schedule_logs_both_phases(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    trainer = trainer_for(tmp_path, ExampleWeights(32), data, max_steps=4, logging_steps=1,
                          phase1_method="hessian_free", phase1_steps=2, num_directions=2)  # fmt: skip
    trainer.train()
    phases = [e["phase"] for e in trainer.state.log_history if "phase" in e]
    assert phases == [1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_losses_follow_the_policy(tmp_path, policy):
    _, data = fact_data(num_facts=8, copies=4)
    outer = ExampleWeights(32)
    trainer = trainer_for(tmp_path, outer, data, max_steps=2, inner_optimizer="sgd", inner_lr=1e30,
                          nonfinite_policy=policy, num_directions=2)  # fmt: skip
    if policy == "stop":
        with pytest.raises(NonFiniteHypergradientError, match="lower inner_lr"):
            trainer.train()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="All 2 outer steps were skipped"):  # not a silent "success"
            trainer.train()
    assert any("skipped" in str(w.message) for w in caught)
    assert torch.equal(outer.logits.detach(), torch.zeros(32))


def test_regularizer_pulls_weights_back_to_uniform(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    entropies = {}
    for coef in (0.0, 1.0):
        outer = ExampleWeights(32)
        trainer = trainer_for(tmp_path / str(coef), outer, data, max_steps=8, weight_regularization="kl_uniform",
                              weight_regularization_coef=coef, num_directions=4)  # fmt: skip
        trainer.train()
        entropies[coef] = outer.summary()["weight_entropy"]
    assert entropies[1.0] > entropies[0.0]


# -- bad input --------------------------------------------------------------------------------------------------
def test_missing_or_out_of_range_example_ids(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    numbered = trainer_for(tmp_path, ExampleWeights(32), {**data, "train": data["train"].remove_columns("example_id")})
    assert numbered.train_dataset["example_id"] == list(range(32))  # rows without ids are numbered in order
    with pytest.raises(ValueError, match=r"ids in \[0, 31\].*10 logits"):
        trainer_for(tmp_path, ExampleWeights(10), data)


def test_missing_domain_column_and_unknown_domains(tmp_path):
    data = two_domain_data()
    with pytest.raises(ValueError, match="no column \\['source'\\]"):
        trainer_for(tmp_path, DomainWeights(["target", "other"], domain_column="source"), data)
    with pytest.raises(ValueError, match="does not know"):
        trainer_for(tmp_path, DomainWeights(["target", "third"]), data)


def test_missing_or_empty_meta_dataset(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    for meta in (None, data["meta"].select([])):
        with pytest.raises(ValueError, match="meta_dataset is missing or empty"):
            trainer_for(tmp_path, ExampleWeights(32), {**data, "meta": meta})
    with pytest.raises(ValueError, match="no 'input_ids'"):
        trainer_for(tmp_path, ExampleWeights(32), {**data, "meta": data["meta"].remove_columns("input_ids")})


def test_model_without_trainable_parameters_and_peft_targeting_nothing(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        BilevelTrainer(frozen, config(tmp_path), train_dataset=data["train"], meta_dataset=data["meta"],
                       outer=ExampleWeights(32))  # fmt: skip
    with pytest.raises(ValueError, match="targets nothing.*q_proj"):
        BilevelTrainer(tiny_llama(), config(tmp_path), train_dataset=data["train"], meta_dataset=data["meta"],
                       outer=ExampleWeights(32), peft_config=LoraConfig(target_modules=["c_attn"]))  # fmt: skip


def test_flash_attention_with_forward_mode_is_refused_at_construction(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="finite_difference"):
        trainer_for(tmp_path, ExampleWeights(32), data, model=model)
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"
    trainer_for(tmp_path, ExampleWeights(32), data, model=model, jvp="finite_difference")  # the documented fix


def test_truncation_that_hides_rows_from_per_example_weights_warns(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    with pytest.warns(UserWarning, match="first 1 inner steps.*zero hypergradient"):
        trainer_for(tmp_path, ExampleWeights(32), data, method="trgu", truncation=1, unroll_steps=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*inner steps.*zero hypergradient")
        trainer_for(tmp_path, ExampleWeights(32), data, method="trgu", truncation=2, unroll_steps=2)


def test_directions_are_counted_against_the_rows_of_one_unroll(tmp_path):
    """Issue 36: 32 basis directions on 64 per-row weights passed construction and failed at step 0, where one unroll
    (2 steps × 8 rows) has 16 coordinates; 32 random directions there were not warned about."""
    _, data = fact_data()  # 64 train rows
    outer = ExampleWeights(len(data["train"]))
    unroll = r"the 16 coordinates one unroll can affect \(unroll_steps=2 × 8 rows × 1 processes, of the 64 of Exa"
    with pytest.raises(ValueError, match=rf"directions=.basis. with num_directions=32, but {unroll}.*step 0 would"):
        trainer_for(tmp_path, outer, data, directions="basis", num_directions=32)
    with pytest.warns(UserWarning, match=rf"num_directions=32 exceeds {unroll}.*Use at most 16"):
        trainer_for(tmp_path, outer, data, directions="rademacher", num_directions=32)
    trainer = trainer_for(tmp_path, outer, data, directions="basis", num_directions=16, max_steps=1)
    trainer.train()  # what step 0 needs: it runs
    assert trainer.state.global_step == 1 and math.isfinite(trainer.state.log_history[-1]["train_loss"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"gradient_checkpointing": True}, "gradient_checkpointing"),
        ({"fsdp": "full_shard"}, "FSDP"),
        ({"method": "maml"}, "method='maml'"),
        ({"unroll_steps": 0}, "unroll_steps=0"),
        ({"phase1_steps": 3}, "phase1_method"),
        ({"gradient_accumulation_steps": 2}, "one outer step"),
        ({"nonfinite_policy": "ignore"}, "nonfinite_policy"),
        ({"process_split": "data", "method": "cg"}, "process_split='directions'"),
        (
            {"process_split": "data", "phase1_method": "hessian_free", "phase1_steps": 2},
            r"\['fg2u', 'rgu', 'trgu'\] do",
        ),
        ({"checkpoint_every": 0}, "checkpoint_every=0 must be >= 1"),
        ({"memory_budget_mb": 0}, "memory_budget_mb=0 must be > 0"),
        ({"method": "betty"}, "'auto'"),
        ({"process_split": "rows"}, "process_split"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_training_args_on_disk_hold_no_token(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    trainer = trainer_for(tmp_path, ExampleWeights(32), data, max_steps=1, num_directions=2, hub_token="hf_secret")
    trainer.train()
    trainer.save_model()
    folder = tmp_path / "run"
    for path in folder.rglob("*"):
        if path.is_file():
            assert b"hf_secret" not in path.read_bytes(), path
    state = json.loads((folder / "bilevel_state.json").read_text())
    assert state["outer_type"] == "ExampleWeights" and "hub_token" not in json.dumps(state)
    assert set(load_file(folder / "bilevel_state.safetensors")) >= {f"initial/{n}" for n in trainer._inner_params}


def test_soft_prompt_from_text_copies_the_token_embeddings():
    model = tiny_llama()
    prompt = SoftPrompt.from_text("ab", TOKENIZER, model, num_virtual_tokens=3)
    ids = TOKENIZER("ab", add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(prompt.embeddings.detach(), table[torch.tensor([ids[0], ids[1], ids[0]])])
    with pytest.raises(ValueError, match="non-empty"):
        SoftPrompt.from_text("", TOKENIZER, model)


def test_soft_prompt_is_also_saved_as_a_peft_prompt_tuning_adapter(tmp_path):
    _, data = fact_data(num_facts=8, copies=4)
    prompt = SoftPrompt(3, 32, init_std=0.5)
    trainer = trainer_for(tmp_path, prompt, data, max_steps=1, num_directions=2, optim="sgd", learning_rate=0.05)
    trainer.train()
    trainer.save_model()
    adapter = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "run" / "prompt_adapter"))
    torch.testing.assert_close(adapter.get_prompt_embedding_to_save("default"), prompt.embeddings.detach())


def test_auroc_matches_the_pairwise_definition_and_scales_to_large_n():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (300,), generator=gen).double()  # many ties
    positives = torch.rand(300, generator=gen) < 0.3
    pos, neg = scores[positives], scores[~positives]
    pairwise = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert auroc(scores, positives) == pytest.approx(float(pairwise), abs=1e-12)
    assert auroc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([True, False, False])) == 0.5
    n = 2_000_000  # the pairwise matrix would need n²/4 = 10¹² entries
    big = torch.arange(n, dtype=torch.float64)
    assert auroc(big, big >= n // 2) == 1.0 and auroc(-big, big >= n // 2) == 0.0
    assert math.isnan(auroc(torch.ones(3), torch.zeros(3, dtype=torch.bool)))


@pytest.mark.parametrize("method", ["rgu", "fg2u"])
def test_per_example_weights_unroll_only_their_rows_with_the_same_result(tmp_path, monkeypatch, method):
    """The engine differentiates the logits of the unroll's rows only (16 of 64 here; before, all 64: directions,
    tangents and the φ-adjoint reduced across ranks grew with the dataset), and the weights come out bit for bit
    as with the whole φ (sigmoid weights, whose mean share is read from every row)."""
    import hf_fg2u.trainer.bilevel as bilevel

    engine, sizes = bilevel.estimate_hypergradient, []

    def recording(inner_loss, outer_loss, params, outer, *args, **kwargs):
        sizes.append(outer["logits"].numel())
        return engine(inner_loss, outer_loss, params, outer, *args, **kwargs)

    monkeypatch.setattr(bilevel, "estimate_hypergradient", recording)
    _, data = fact_data()
    logits = {}
    for restricted in (True, False):
        if not restricted:
            monkeypatch.setattr(ExampleWeights, "restrict", lambda self, batches, active: None)
        outer = ExampleWeights(len(data["train"]), parametrization="sigmoid")
        trainer_for(tmp_path / str(restricted), outer, data, max_steps=4, method=method, num_directions=4).train()
        logits[restricted] = outer.logits.detach().clone()
    assert sizes == [16] * 4 + [64] * 4
    assert torch.equal(logits[True], logits[False])  # the same operations on the same numbers
    assert (logits[True] != 0).sum() == 64
