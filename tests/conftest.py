"""Shared fixtures: a closed-form bilevel quadratic and tiny causal LMs built from config (no downloads)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 64


class Quadratic:
    """Inner L = ½θᵀAθ − θᵀBφ, outer f = ½‖θ − c‖² + dᵀφ: with SGD, θ_T is affine in φ and ∇h is exact.

    θ_t = Mθ_{t-1} + αBφ with M = I − αA, so dθ_T/dφ = Σ_{k<T} M^k αB and ∇h = (dθ_T/dφ)ᵀ(θ_T − c) + d.
    """

    def __init__(self, n=6, m=5, seed=0, direct=True, dtype=torch.float64):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(n, n, generator=gen, dtype=dtype)
        self.A = q @ q.T / n + 0.5 * torch.eye(n, dtype=dtype)
        self.B = torch.randn(n, m, generator=gen, dtype=dtype)
        self.c = torch.randn(n, generator=gen, dtype=dtype)
        self.d = torch.randn(m, generator=gen, dtype=dtype) if direct else torch.zeros(m, dtype=dtype)
        self.params = {"theta": torch.randn(n, generator=gen, dtype=dtype)}
        self.outer = {"phi": torch.randn(m, generator=gen, dtype=dtype)}

    def inner_loss(self, params, outer, batch):
        theta = params["theta"]
        return 0.5 * theta @ self.A @ theta - theta @ (self.B @ outer["phi"])

    def outer_loss(self, params, outer, batch):
        return 0.5 * ((params["theta"] - self.c) ** 2).sum() + self.d @ outer["phi"]

    def unrolled_sgd_gradient(self, steps: int, lr: float) -> torch.Tensor:
        n = self.A.shape[0]
        step_map = torch.eye(n, dtype=self.A.dtype) - lr * self.A
        theta, jacobian = self.params["theta"], torch.zeros_like(self.B)
        for _ in range(steps):
            theta = step_map @ theta + lr * self.B @ self.outer["phi"]
            jacobian = step_map @ jacobian + lr * self.B
        return jacobian.T @ (theta - self.c) + self.d

    def implicit_gradient(self) -> torch.Tensor:
        theta_star = torch.linalg.solve(self.A, self.B @ self.outer["phi"])
        return self.B.T @ torch.linalg.solve(self.A, theta_star - self.c) + self.d

    def unrolled_value(self, outer, steps, optimizer):
        from hf_fg2u.hypergrad.unroll import run_inner_loop

        params, _, _ = run_inner_loop(
            self.inner_loss, optimizer, self.params, optimizer.init(self.params), outer, [None] * steps,
            [None] * steps,
        )  # fmt: skip
        return self.outer_loss(params, outer, None)


@pytest.fixture
def quadratic():
    return Quadratic()


def tiny_lm(arch: str = "llama", attn: str = "eager", dtype=torch.float32, seed: int = 0, rank: int = 4):
    """A 2-layer causal LM from config wrapped in LoRA, with lora_B perturbed away from zero so that
    hypergradient comparisons do not compare zeros (peft initialises lora_B = 0)."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn,
        )  # fmt: skip
        model, targets, fan_in_fan_out = LlamaForCausalLM(config), ["q_proj", "v_proj"], False
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_implementation=attn,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
        model, targets, fan_in_fan_out = GPT2LMHeadModel(config), ["c_attn"], True
    else:
        raise ValueError(arch)
    lora = LoraConfig(r=rank, lora_alpha=8, target_modules=targets, lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out)
    model = get_peft_model(model, lora).to(dtype)
    model.eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    return model


def random_lm_batches(steps: int, batch_size: int = 4, length: int = 10, seed: int = 1):
    """``steps`` inner batches with consecutive example ids, and a meta batch, of random tokens."""
    gen = torch.Generator().manual_seed(seed)

    def batch(first_id=None):
        out = {
            "input_ids": torch.randint(0, VOCAB, (batch_size, length), generator=gen),
            "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        }
        if first_id is not None:
            out["example_id"] = torch.arange(first_id, first_id + batch_size)
        return out

    return [batch(t * batch_size) for t in range(steps)], batch()


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy machine OpenMP waits make a step take ~1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub(monkeypatch):
    """A stand-in Hub on 127.0.0.1 that accepts the token "hf_fake"; the client is pointed at it."""
    from .fake_hub import FakeHub

    with FakeHub(token="hf_fake") as fake:
        fake.patch_endpoint(monkeypatch)
        yield fake
