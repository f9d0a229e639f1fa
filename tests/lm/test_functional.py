"""The functional bridge and its preflight: clear errors instead of crashes deep inside torch."""

import pytest
import torch
import torch.distributed as dist

from hf_fg2u.hypergrad import estimate_hypergradient
from hf_fg2u.lm.losses import (
    make_lm_problem,
    per_example_lm_loss,
    per_example_token_loss,
    predicting_positions,
    takes_logits_to_keep,
)
from hf_fg2u.lm.params import functional_forward, preflight, trainable_parameters, unwrap_model
from tests.helpers.tiny import random_lm_batches, tiny_lm


def test_functional_forward_matches_the_module():
    model = tiny_lm("llama")
    batches, _ = random_lm_batches(1)
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    expected = model(**inputs).logits
    params = trainable_parameters(model)
    torch.testing.assert_close(functional_forward(model, params, **inputs).logits, expected)
    shifted = {k: v + 1.0 for k, v in params.items()}
    assert not torch.allclose(functional_forward(model, shifted, **inputs).logits, expected)


def test_token_loss_masks_ignored_positions_and_matches_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    logits[0, 3:] = float("nan")  # padded positions may hold garbage; it must not leak
    losses = per_example_token_loss(logits, labels)
    for i in range(2):
        shift_logits, shift_labels = logits[i, :-1], labels[i, 1:]
        keep = shift_labels != -100
        expected = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep])
        torch.testing.assert_close(losses[i], expected)


def test_no_trainable_parameters_is_a_clear_error():
    model = tiny_lm("llama")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="LoraConfig"):
        trainable_parameters(model)


@pytest.mark.parametrize("kernel", ["flash_attention_2", "flex_attention"])
def test_kernels_without_forward_ad_name_the_alternatives(kernel):
    model = tiny_lm("llama")
    model.base_model.model.config._attn_implementation = kernel
    with pytest.raises(ValueError, match="finite_difference") as error:
        make_lm_problem(model, second_order=True)
    assert "attn_implementation='eager'" in str(error.value)
    make_lm_problem(model, second_order=False)  # first-order methods may keep the kernel


def test_sdpa_runs_under_the_math_kernel():
    model = tiny_lm("llama", "sdpa")
    context = preflight(model, second_order=True)
    with context():
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()


def test_gradient_checkpointing_is_refused():
    model = tiny_lm("llama")
    model.base_model.model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="Gradient checkpointing"):
        make_lm_problem(model)


@pytest.fixture
def process_group(tmp_path):
    # A file rendezvous: no port to find free, close and then race another test run for.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapper_is_unwrapped_and_the_estimate_is_the_same(process_group):
    model = tiny_lm("llama")
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    assert unwrap_model(wrapped) is model
    batches, meta = random_lm_batches(2)
    outer = {"example_logits": torch.zeros(8)}
    from hf_fg2u.lm.losses import batch_softmax_weights

    results = []
    for candidate in (model, wrapped):
        inner_loss, outer_loss = make_lm_problem(candidate, batch_softmax_weights())
        params = trainable_parameters(candidate)
        results.append(estimate_hypergradient(inner_loss, outer_loss, params, outer, batches, meta, inner_lr=0.5))
    torch.testing.assert_close(results[0].grad["example_logits"], results[1].grad["example_logits"])


def test_fsdp_is_refused_with_the_alternatives(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = tiny_lm("llama")
    try:
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    except Exception as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"FSDP cannot wrap a CPU module in this torch build: {error}")
    with pytest.raises(ValueError, match="FSDP"):
        unwrap_model(wrapped)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_only_where_a_label_is_predicted_give_the_same_losses_and_gradients(arch):
    """Answer-only labels that end at different positions per row: the loss from the logits at the predicting
    positions only (logits_to_keep) equals the full one, value and θ-gradient, with and without a soft prompt; the
    model is really asked for fewer logits."""
    model = tiny_lm(arch, dtype=torch.float64)
    params = trainable_parameters(model)
    (batch,), _ = random_lm_batches(1, batch_size=3, length=10)
    labels = batch["input_ids"].clone().fill_(-100)
    for row, (start, end) in enumerate([(4, 6), (7, 8), (2, 10)]):
        labels[row, start:end] = batch["input_ids"][row, start:end]
    batch = {**batch, "labels": labels}
    assert takes_logits_to_keep(model)
    positions = predicting_positions(labels)
    assert positions.tolist() == [1, 2, 3, 4, 5, 6, 7, 8]  # position 0 predicts nothing labelled
    hidden = model.get_input_embeddings().weight.shape[1]
    prefix = torch.randn(2, hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for soft_prompt in (None, prefix):
        found = {}
        for keep in (False, True):
            grads, value = torch.func.grad_and_value(
                lambda p, keep=keep, s=soft_prompt: per_example_lm_loss(model, p, batch, s, keep_logits=keep).sum()
            )(params)
            found[keep] = (value, grads)
        torch.testing.assert_close(found[True][0], found[False][0], rtol=1e-12, atol=1e-12)
        for name in params:
            torch.testing.assert_close(found[True][1][name], found[False][1][name], rtol=1e-10, atol=1e-12)
    shapes = []
    model.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.logits.shape)))
    per_example_lm_loss(model, params, batch, keep_logits=True)
    assert shapes[-1][1] == 8  # of 10 positions
    every = torch.full_like(labels, 5)
    assert predicting_positions(every) is None  # every position predicts a label: the plain call
