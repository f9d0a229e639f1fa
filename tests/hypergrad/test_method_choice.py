"""``method="auto"`` on both sides of its memory threshold, and full-parameter inner variables (no adapter)."""

import pytest
import torch
from transformers.testing_utils import CaptureLogger

from hf_fg2u import BilevelTrainer, ExampleWeights
from hf_fg2u.hypergrad import METHODS, estimate_hypergradient
from hf_fg2u.hypergrad.auto import MemoryModel, available_megabytes, choose_method, trajectory_megabytes
from hf_fg2u.lm.losses import batch_softmax_weights, make_lm_problem
from hf_fg2u.lm.params import trainable_parameters
from hf_fg2u.trainer.bilevel import logger
from hf_fg2u.trainer.model_setup import wrap_with_peft
from tests.helpers.tiny import TOKENIZER, config, fact_data, gpt2, lora, random_lm_batches, tiny_llama

T = 4


def auto_trainer(tmp_path, budget_mb, peft=True, **overrides):
    _, data = fact_data(num_facts=4, copies=4)
    args = config(tmp_path, method="auto", memory_budget_mb=budget_mb, unroll_steps=T, per_device_train_batch_size=4,
                  max_steps=1, logging_steps=1, inner_optimizer="adam", **overrides)  # fmt: skip
    with CaptureLogger(logger) as captured:
        trainer = BilevelTrainer(
            tiny_llama(), args, train_dataset=data["train"], meta_dataset=data["meta"],
            outer=ExampleWeights(len(data["train"])), peft_config=lora() if peft else None, processing_class=TOKENIZER,
        )  # fmt: skip
    return trainer, captured.out


def adapter_megabytes(checkpoint_every=1):
    """What auto_trainer's trajectory needs: θ of the same LoRA on the same model."""
    params = trainable_parameters(wrap_with_peft(tiny_llama(), lora()))
    return trajectory_megabytes(params, "adam", T, checkpoint_every)


def test_auto_picks_rgu_when_the_whole_trajectory_fits_and_logs_why(tmp_path):
    whole = adapter_megabytes()
    trainer, log = auto_trainer(tmp_path, budget_mb=1.01 * whole)
    assert (trainer.args.method, trainer.args.checkpoint_every) == ("rgu", 1)
    assert f"picked 'rgu' (exact): it needs {whole:.1f} MB with the whole trajectory stored" in log
    assert "available (memory_budget_mb)" in log
    trainer.train()
    assert trainer.state.log_history[0]["meta_loss"] > 0 and "phase" not in trainer.state.log_history[0]


def test_auto_checkpoints_the_trajectory_when_only_that_fits(tmp_path):
    whole, checkpointed = adapter_megabytes(), adapter_megabytes(checkpoint_every=2)  # ⌈√4⌉ = 2
    assert checkpointed < whole
    trainer, log = auto_trainer(tmp_path, budget_mb=(whole + checkpointed) / 2)
    assert (trainer.args.method, trainer.args.checkpoint_every) == ("rgu", 2)
    assert "checkpoint_every=2" in log


def adapter_model():
    return MemoryModel.of(trainable_parameters(wrap_with_peft(tiny_llama(), lora())), "adam")


def test_auto_picks_fg2u_when_only_fg2u_fits(tmp_path):
    checkpointed, fg2u = adapter_megabytes(checkpoint_every=2), adapter_model().fg2u_megabytes(1)
    assert fg2u < checkpointed  # one direction per pass: fg2u holds less than checkpointed rgu at T=4
    trainer, log = auto_trainer(tmp_path, budget_mb=(fg2u + checkpointed) / 2, directions_per_pass=1)
    assert trainer.args.method == "fg2u"
    assert "picked 'fg2u'" in log
    trainer.train()
    assert trainer.state.log_history[0]["directions_per_second"] > 0


def test_auto_costs_fg2u_and_takes_what_needs_least_when_nothing_fits(tmp_path):
    """8 directions per pass at T=4 hold more than checkpointed rgu: fg2u is no fallback then."""
    checkpointed, fg2u = adapter_megabytes(checkpoint_every=2), adapter_model().fg2u_megabytes(8)
    assert checkpointed < fg2u
    trainer, log = auto_trainer(tmp_path, budget_mb=0.5 * checkpointed, directions_per_pass=8)
    assert (trainer.args.method, trainer.args.checkpoint_every) == ("rgu", 2)
    assert "nothing fits; this needs the least" in log


def test_memory_model_counts_slots_trainer_copies_and_offloading(monkeypatch):
    """In MB of a 1 MB float32 θ: the trainer's copies 2(θ+s), a step's gradient, new θ and new s, the update's
    intermediates (SGD 1, Adam 4); rgu adds ⌈T/k⌉+k−1 stored (θ, s), their adjoints, and a step's VJP (2θ +
    the intermediates); fg2u adds per direction of a pass 2(θ+s) + the gradient's tangent + 2θ of the update's JVP."""
    params = {"w": torch.zeros(2**18)}
    assert trajectory_megabytes(params, "sgd", 10) == pytest.approx((2 + 2 + 1) + 10 + (1 + 2 + 1))
    assert trajectory_megabytes(params, "adam", 10) == pytest.approx((6 + 2 + 2 + 4) + 30 + (3 + 2 + 4))
    assert trajectory_megabytes(params, "adam", 16, checkpoint_every=4) == pytest.approx(14 + 3 * (4 + 3) + 9)
    assert MemoryModel.of(params, "adam").fg2u_megabytes(8) == pytest.approx(14 + 8 * (6 + 1 + 2))
    # bf16 θ: θ halves, the optimizer's float32 moments do not.
    half = MemoryModel.of({"w": torch.zeros(2**18, dtype=torch.bfloat16)}, "adam")
    assert (half.theta_bytes, half.state_bytes) == (2**19, 2**21)
    # offload_trajectory keeps the stored states off an accelerator (here the meta device stands for one).
    on_device = {"w": torch.zeros(2**18, device="meta")}
    kept = choose_method(on_device, "adam", 10, (1e9, "test"))
    offloaded = choose_method(on_device, "adam", 10, (1e9, "test"), offload_trajectory=True)
    assert kept.trajectory_mb - offloaded.trajectory_mb == pytest.approx(30)
    # On CPU the processes of one machine share its memory.
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 8 * 2**20})())
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert available_megabytes(None, torch.device("cpu")) == (1.0, "half of the available system memory / 4 processes")


FULL_INNER = [r"layers\.1\.", "lm_head"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_full_parameter_inner_variables(tmp_path, method):
    """No peft config: θ is the parameters ``inner_parameters`` selects; the rest stays frozen and unchanged."""
    _, data = fact_data(num_facts=4, copies=4)
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = config(tmp_path, method=method, max_steps=1, per_device_train_batch_size=4, num_directions=4,
                  inner_parameters=FULL_INNER, truncation=2, logging_steps=1)  # fmt: skip
    trainer = BilevelTrainer(model, args, train_dataset=data["train"], meta_dataset=data["meta"],
                             outer=ExampleWeights(len(data["train"])), processing_class=TOKENIZER)  # fmt: skip
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    selected = {n for n in before if "layers.1." in n or "lm_head" in n}
    assert changed and changed <= selected, sorted(changed - selected)
    assert trainer.state.log_history[0]["hypergrad_norm"] > 0


def test_inner_parameters_that_match_nothing_name_the_parameters(tmp_path):
    _, data = fact_data(num_facts=4, copies=4)
    args = config(tmp_path, inner_parameters=["attention_query"])
    with pytest.raises(ValueError, match=r"'attention_query' matches none .* include \['model.embed_tokens.weight'"):
        BilevelTrainer(tiny_llama(), args, train_dataset=data["train"], meta_dataset=data["meta"],
                       outer=ExampleWeights(len(data["train"])))  # fmt: skip


def test_fg2u_basis_equals_rgu_on_full_parameters():
    """Every weight of a float64 GPT-2 is θ: forward-mode FGU with the coordinate basis is the exact gradient."""
    model = gpt2(lora=False)
    batches, meta = random_lm_batches(3, 4)
    inner_loss, outer_loss = make_lm_problem(model, batch_softmax_weights(), second_order=True)
    outer = {"example_logits": torch.linspace(-0.5, 0.5, 12, dtype=torch.float64)}
    params = trainable_parameters(model)
    common = dict(inner_optimizer="adam", inner_lr=1e-2)
    exact = estimate_hypergradient(inner_loss, outer_loss, params, outer, batches, meta, method="rgu", **common)
    basis = estimate_hypergradient(inner_loss, outer_loss, params, outer, batches, meta, method="fg2u",
                                   directions="basis", num_directions=12, **common)  # fmt: skip
    reference = exact.grad["example_logits"]
    assert float(reference.norm()) > 1e-6
    assert float((basis.grad["example_logits"] - reference).norm() / reference.norm()) < 1e-8


def test_auto_plans_with_half_the_free_accelerator_memory(monkeypatch):
    """Issue 26 item 4: the accelerator branch of the default budget (a GPU's free memory after the model)."""
    seen = []

    def free_and_total(device):
        seen.append(device)
        return 6 * 2**30, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_and_total)
    device = torch.device("cuda", 1)
    assert available_megabytes(None, device) == (3 * 1024.0, "half of the free memory of cuda:1")
    assert seen == [device]
    assert available_megabytes(512, device) == (512.0, "memory_budget_mb")  # an explicit budget wins
