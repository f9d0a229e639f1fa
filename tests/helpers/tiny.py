"""Tiny models built from config, their data, and a closed-form bilevel quadratic (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import DatasetDict
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hf_fg2u import BilevelConfig, BilevelTrainer
from hf_fg2u.lm.formats import IGNORE_INDEX, tokenize_dataset
from hf_fg2u.lm.toy_data import make_char_tokenizer, make_fact_splits

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

    def unrolled_sgd_gradient(self, steps: int, lr: float, meta_map: torch.Tensor | None = None) -> torch.Tensor:
        """∇h in closed form; ``meta_map`` (a matrix) is applied to the meta gradient θ_T − c first."""
        n = self.A.shape[0]
        step_map = torch.eye(n, dtype=self.A.dtype) - lr * self.A
        theta, jacobian = self.params["theta"], torch.zeros_like(self.B)
        for _ in range(steps):
            theta = step_map @ theta + lr * self.B @ self.outer["phi"]
            jacobian = step_map @ jacobian + lr * self.B
        meta_gradient = theta - self.c if meta_map is None else meta_map @ (theta - self.c)
        return jacobian.T @ meta_gradient + self.d

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


TOKENIZER = make_char_tokenizer()


# A chat template in the character tokenizer's alphabet: "user: hi\nassistant: yo\n".
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
LORA_TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, attn: str = "eager"):
    """initializer_range=0.2: with the default 0.02, a frozen lm_head behind RMSNorm caps the logits of a
    random 32-wide model at about ±0.6 and LoRA cannot learn anything."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation=attn, initializer_range=0.2,
        pad_token_id=TOKENIZER.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def write_tiny_gguf(folder, name: str = "tiny.gguf", seed: int = 0) -> str:
    """A 2-layer Llama as a float32 GGUF file in ``folder`` (for ``from_pretrained(folder, gguf_file=name)``), sized
    like :func:`tiny_llama` for ``TOKENIZER``'s ids, with the output head tied to the embeddings as in SmolLM2's.
    It holds no tokenizer: transformers' loader needs none for the model. Needs the ``gguf`` package."""
    import gguf
    import numpy as np

    vocab, hidden, intermediate, layers, heads, kv_heads = len(TOKENIZER), 32, 64, 2, 4, 2
    writer = gguf.GGUFWriter(str(Path(folder) / name), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(seed)

    def add(tensor_name, *shape):  # std 0.2, as tiny_llama's initializer_range; RMSNorm weights 1
        values = np.ones(shape) if len(shape) == 1 else 0.2 * rng.standard_normal(shape)
        writer.add_tensor(tensor_name, values.astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    add("output_norm.weight", hidden)
    kv_width = hidden * kv_heads // heads
    for block in range(layers):
        for part, shape in [
            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
            ("attn_k", (kv_width, hidden)), ("attn_v", (kv_width, hidden)), ("attn_output", (hidden, hidden)),
            ("ffn_gate", (intermediate, hidden)), ("ffn_up", (intermediate, hidden)),
            ("ffn_down", (hidden, intermediate)),
        ]:  # fmt: skip
            add(f"blk.{block}.{part}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return name


def lora():
    return LoraConfig(r=8, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0)


def tokenized(splits: DatasetDict, max_length: int = 10, pad_to: int | None = None) -> DatasetDict:
    """``splits`` tokenized by the product's own path (``formats.tokenize_dataset``); ``pad_to``: every row padded
    to that many tokens (benchmarks that fix the sequence length)."""

    def pad(row):
        gap = pad_to - len(row["input_ids"])
        fill = {"input_ids": TOKENIZER.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {key: row[key] + [value] * gap for key, value in fill.items()}

    out = DatasetDict({name: tokenize_dataset(split, TOKENIZER, max_length, name) for name, split in splits.items()})
    return out if pad_to is None else out.map(pad)


def fact_data(num_facts=8, copies=8, corrupted_fraction=0.4, seed=0):
    splits = make_fact_splits(num_facts, copies, seed=seed, corrupted_fraction=corrupted_fraction)
    return splits, tokenized(splits)


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"), max_steps=32, per_device_train_batch_size=8, unroll_steps=2,
        meta_batch_size=16, num_directions=16, directions="orthogonal", inner_lr=1e-2, learning_rate=0.5,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=8, use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return BilevelConfig(**values)


def trainer_for(tmp_path, outer, data, model=None, **overrides):
    return BilevelTrainer(
        model or tiny_llama(), config(tmp_path, **overrides), train_dataset=data["train"],
        meta_dataset=data["meta"], eval_dataset=data["eval"], outer=outer, peft_config=lora(),
        processing_class=TOKENIZER,
    )  # fmt: skip


def gpt2(dropout: float = 0.0, lora: bool = True):
    if lora:
        model = tiny_lm("gpt2", "eager", dtype=torch.float64)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = dropout
        if dropout:
            model.train()
        return model
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, attn_implementation="eager",
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)  # fmt: skip
    model = GPT2LMHeadModel(config).to(torch.float64)
    model.train(dropout > 0)
    return model
