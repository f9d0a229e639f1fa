"""BilevelConfig validation: every bad value is refused at construction with the field, the value and the fix."""

import math

import pytest

from hf_fg2u import BilevelConfig
from hf_fg2u.trainer.redaction import REDACTED


def make(tmp_path, **overrides):
    return BilevelConfig(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        # outer optimizer: an inf/NaN learning rate or penalty turned φ into NaN without a warning
        ({"learning_rate": math.inf}, r"learning_rate=inf must be a finite number in \[0, inf\)"),
        ({"learning_rate": math.nan}, "learning_rate=nan"),
        ({"learning_rate": -0.1}, "learning_rate=-0.1"),
        ({"weight_regularization_coef": math.nan}, "weight_regularization_coef=nan"),
        ({"weight_regularization_coef": 1e39}, r"weight_regularization_coef=1e\+39 must be a finite number in \[0, "),
        ({"weight_regularization_coef": -1.0}, "weight_regularization_coef=-1.0"),
        ({"adam_beta1": 1.5}, r"adam_beta1=1.5 must be a finite number in \[0, 1\)"),
        ({"adam_beta2": math.nan}, "adam_beta2=nan"),
        ({"adam_epsilon": 0.0}, "adam_epsilon=0.0"),
        ({"weight_decay": -0.01}, "weight_decay=-0.01"),
        ({"max_grad_norm": math.nan}, "max_grad_norm=nan"),
        # inner optimizer and methods: the per-step warning used to blame inner_lr for these
        ({"inner_lr": math.nan}, "inner_lr=nan"),
        ({"inner_lr": math.inf}, "inner_lr=inf"),
        ({"inner_beta1": 1.5}, r"inner_beta1=1.5 must be a finite number in \[0, 1\)"),
        ({"inner_beta2": 1.0}, "inner_beta2=1.0"),
        ({"inner_momentum": -0.1}, "inner_momentum=-0.1"),
        ({"inner_weight_decay": -1.0}, "inner_weight_decay=-1.0"),
        ({"inner_weight_decay": math.inf}, "inner_weight_decay=inf"),
        ({"zo_epsilon": 0.0}, r"zo_epsilon=0.0 must be a finite number in \(0, inf\)"),
        ({"zo_epsilon": -1e-3}, "zo_epsilon=-0.001"),
        ({"cg_damping": -0.1}, r"cg_damping=-0.1 must be a finite number in \[0, inf\)"),
        ({"neumann_lr": 0.0}, "neumann_lr=0.0"),
        # silently ignored or crashing deep inside functorch at step 1
        ({"fp16": True}, "fp16=True, bf16=False on CPU.*Set fp16=False"),
        ({"bf16": True}, "bf16=True on CPU"),
        ({"gradient_checkpointing": True, "method": "hessian_free"}, "gradient_checkpointing=True.*Set it to False"),
        ({"gradient_checkpointing": True, "method": "fg2u_zo"}, "gradient_checkpointing=True.*Set it to False"),
        ({"activation_checkpointing": True, "method": "hessian_free"}, "gradient_checkpointing=True"),
    ],
)
def test_bad_numbers_and_modes_are_refused_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, **overrides)


def test_edges_of_the_ranges_are_accepted(tmp_path):
    args = make(tmp_path, learning_rate=0.0, inner_beta1=0.0, inner_momentum=0.0, cg_damping=0.0,
                weight_regularization_coef=0.0, inner_weight_decay=0.0, zo_epsilon=1e-8)  # fmt: skip
    assert (args.inner_beta1, args.cg_damping, args.zo_epsilon) == (0.0, 0.0, 1e-8)


@pytest.mark.parametrize(
    "kwargs, kept",
    [  # issue 25 item 2: credentials under other key names, found by key and by shape
        ({"proxies": {"https": "http://bob:PASS@proxy:3128"}}, None),
        ({"headers": {"Authorization": "Bearer abc.def"}}, None),
        ({"auth": "ghp_" + "b" * 36}, None),
        ({"endpoint": "https://bob:PASS@mirror.example/models"}, None),
        ({"note": "Basic Ym9iOlBBU1M="}, None),
        ({"extra": ["sk-" + "c" * 40, "xoxb-1-2-3"]}, None),
        ({"aws": {"id": "AKIA" + "D" * 16}}, None),
        ({"revision": "main", "cache_dir": "/data/hf", "mirror": "https://mirror.example/models"}, "all"),
    ],
)
def test_credentials_are_redacted_by_key_and_by_shape(tmp_path, kwargs, kept):
    import json

    args = make(tmp_path, model_init_kwargs=json.dumps(kwargs))
    written = json.dumps(args.bilevel_fields()) + args.to_json_string() + json.dumps(vars(args.redacted()), default=str)
    secrets = ["PASS", "abc.def", "b" * 36, "Ym9iOlBBU1M=", "c" * 40, "xoxb-1-2-3", "D" * 16]
    assert not [secret for secret in secrets if secret in written]
    if kept:
        assert args.redacted().model_init_kwargs == kwargs  # nothing that is not a credential is touched


def test_credentials_are_redacted_from_what_is_written(tmp_path):
    secret = "hf_" + "A" * 30
    args = make(
        tmp_path, hub_token="hf_hub_secret",
        model_init_kwargs=f'{{"token": "{secret}", "revision": "main", "quantization_config": {{"api_key": "k1"}}, '
        f'"headers": ["x", "{secret}"], "use_auth_token": true}}',
    )  # fmt: skip
    fields = args.bilevel_fields()["model_init_kwargs"]
    assert fields == {
        "token": REDACTED, "revision": "main", "quantization_config": {"api_key": REDACTED},
        "headers": REDACTED, "use_auth_token": True,
    }  # fmt: skip
    clean = args.redacted()
    assert clean.hub_token is None and clean.model_init_kwargs == fields
    assert args.hub_token == "hf_hub_secret" and args.model_init_kwargs["token"] == secret  # the run keeps them
    logged = args.to_json_string()  # what report_to integrations (tensorboard, wandb, mlflow) record
    assert secret not in logged and "k1" not in logged and "hf_hub_secret" not in logged


def test_every_bilevel_field_is_documented_with_its_type_default_and_help():
    """The class docstring (help(BilevelConfig), API docs) lists every bilevel field and the Trainer defaults it
    changes, from the same metadata the CLI prints: a field added without help fails here."""
    from transformers import TrainingArguments

    from hf_fg2u import BilevelConfig

    doc = BilevelConfig.__doc__
    own = [
        (n, f) for n, f in BilevelConfig.__dataclass_fields__.items() if n not in TrainingArguments.__dataclass_fields__
    ]
    assert len(own) > 30
    for name, spec in own:
        assert spec.metadata.get("help"), name
        assert f"{name} (``" in doc and f"defaults to ``{spec.default!r}``" in doc, name
    assert "learning_rate: ``5e-05`` -> ``0.1``" in doc and "logging_steps: ``500`` -> ``1``" in doc


def test_from_recipe_carries_the_yaml_values_and_the_overrides(tmp_path):
    from hf_fg2u.recipe_yaml import recipe_values

    yaml_values = recipe_values("noisy_reweighting_real")
    config = BilevelConfig.from_recipe("noisy_reweighting_real", output_dir=str(tmp_path), inner_lr=0.002)
    assert (config.method, config.unroll_steps, config.meta_batch_size) == ("rgu", 2, 16)
    assert (config.inner_optimizer, config.inner_warmup_steps, config.learning_rate) == ("adam", 4, 4.0)
    assert config.keep_step_graphs is True and config.normalize_hypergradient is True
    assert config.num_train_epochs == yaml_values["num_train_epochs"] == 3
    assert config.inner_lr == 0.002 and config.output_dir == str(tmp_path)


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("noisy_reweighting_real", {"unrol_steps": 4}, "did you mean 'unroll_steps'"),
        ("noisy_reweighting_real", {"lora_r": 4}, "not fields of BilevelConfig"),
        ("no_such_recipe", {}, "not a packaged recipe; use one of .*noisy_reweighting_real"),
    ],
)
def test_from_recipe_refuses_unknown_fields_and_recipes(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        BilevelConfig.from_recipe(name, **overrides)
