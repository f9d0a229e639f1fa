"""The common interface of outer variables: an ``nn.Module`` whose parameters are φ, read by pure functions
of a dict of tensors (so ``estimate_hypergradient`` can differentiate them) and saved peft-style."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hf_fg2u.registry import Registry


@dataclasses.dataclass
class RestrictedOuter:
    """φ cut down to the coordinates one unroll can affect (per-example weights: its rows), which the engine
    differentiates in place of the whole φ: an outer step's directions, tangents and the φ-adjoint reduced across
    ranks then scale with the unroll's rows, not with the dataset."""

    outer: dict  # the kept coordinates of each key, detached
    inner_batches: list  # the unroll's batches, with what the restricted weights read (see ExampleWeights.restrict)
    kept: torch.Tensor  # the kept coordinates' indices along dimension 0, sorted

    def expand(self, grad: dict, like: dict) -> dict:
        """A gradient over the kept coordinates, scattered into zeros shaped like the whole φ (``like``)."""
        return {k: torch.zeros_like(like[k]).index_copy(0, self.kept, grad[k].to(like[k].dtype)) for k in grad}


CONFIG_NAME = "outer_config.json"
WEIGHTS_NAME = "outer_model.safetensors"
OUTER_TYPES: Registry[type[OuterModule]] = Registry("outer module type")  # every subclass, by class name


class OuterModule(torch.nn.Module):
    """Outer variables φ. Subclasses override the hooks they use; the defaults mean "does not do that".

    ``required_columns`` names the dataset columns that batches must carry for this module. ``config`` is the
    module's typed config (a frozen dataclass of its constructor's arguments, ``config_class``, validated when built),
    saved as JSON so that ``from_pretrained`` can rebuild the module.
    """

    required_columns: tuple[str, ...] = ()
    # Capabilities, declared by each subclass (the trainer reads these, never compares methods with this class):
    reads_losses = True  # whether the weights read the rows' losses (a weighting network); else ids or domains
    num_groups = 1  # groups the weights are measured within; >1 for grouped ExampleWeights
    weighs_rows = False  # whether ``row_weights`` says how much each row counts (exported as a weight column)
    per_row_coordinates = False  # whether φ has coordinates tied to single rows (``active_coordinates``)
    id_column: str | None = None  # a column numbering the train rows, added 0..n-1 when the data has none
    meta_group_column: str | None = None  # a meta column of each meta row's group (grouped weights)
    optional_state: tuple[str, ...] = ()  # state a file of an earlier version lacks; the module fills it in on load

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        OUTER_TYPES.register(cls.__name__, cls)

    config_class: type | None = None  # the subclass's frozen dataclass of constructor arguments

    def __init__(self, config):
        super().__init__()
        if self.config_class is not None and not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__}'s config must be of type {self.config_class.__name__}, "
                f"got {type(config).__name__}."
            )
        self.config = config

    def config_dict(self) -> dict:
        """The config as JSON-ready values (what ``outer_config.json`` holds beside the type)."""
        return dataclasses.asdict(self.config)

    # -- pure functions of φ (a dict like ``outer_dict()``) ---------------------------------------------------
    def example_weights(self, outer: dict, batch: dict, losses: torch.Tensor) -> torch.Tensor | None:
        """Weights [B] of the inner loss's examples (the loss is Σ_i w_i ℓ_i; summing to 1 on average), or None for
        the plain mean.
        ``losses`` are the detached per-example losses, a feature for weighting networks."""
        return None

    def row_weights(self, outer: dict, batch: dict, losses: torch.Tensor) -> torch.Tensor | None:
        """Unnormalised weights [B] comparable across batches (for exporting a dataset's weights), or None."""
        return None

    def prefix(self, outer: dict) -> torch.Tensor | None:
        """Input embeddings [P, H] prepended to every inner and meta example, or None."""
        return None

    @property
    def prefix_length(self) -> int:
        """P, the positions ``prefix`` takes before every example (0 without one)."""
        return 0

    def regularizer(self, outer: dict, kind: str) -> torch.Tensor | None:
        """A scalar penalty on φ ("kl_uniform", "l2"), or None when it does not apply to this module."""
        return None

    # -- data ---------------------------------------------------------------------------------------------
    def prepare_dataset(self, dataset, role: str):
        """Check (and add) the columns this module reads; ``role`` is "train", "meta" or "eval"."""
        return dataset

    def active_coordinates(self, inner_batches: list[dict]) -> dict[str, torch.Tensor] | None:
        """Boolean masks of the coordinates of φ the unroll can affect (default: all)."""
        return None

    def mark_scored(self, active: dict[str, torch.Tensor] | None) -> None:
        """Record that the ``active`` coordinates (one outer step's, the union over ranks) got a hypergradient
        (default: nothing to record, every row's weight is a function of the row)."""

    def scored_rows(self, dataset) -> list[bool] | None:
        """Whether each row of ``dataset`` ever entered an unroll, so its weight was learned, not its starting one;
        None when every row's weight is a function of the row (a weighting network, domain weights)."""
        return None

    def restrict(self, inner_batches: list[dict], active: dict[str, torch.Tensor] | None) -> RestrictedOuter | None:
        """φ cut down to the ``active`` coordinates (the union over ranks), or None: the unroll sees all of φ."""
        return None

    def summary(self) -> dict[str, float]:
        """Numbers worth logging every outer step."""
        return {}

    def project_(self) -> None:
        """Put φ back into its feasible set after an outer step (default: every φ is feasible)."""

    # -- state --------------------------------------------------------------------------------------------
    def outer_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({"type": type(self).__name__, **self.config_dict()}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS_NAME))

    def save_peft_adapter(self, directory: str | Path, model, base_model_name: str | None = None) -> Path | None:
        """Also write the outer variables as a peft adapter where one fits (a soft prompt); default: none."""
        return None

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str = "Upload outer variables",
        private: bool | None = None,
        token: str | None = None,
        revision: str | None = None,
    ) -> str:
        """Upload ``outer_config.json`` and ``outer_model.safetensors`` to the Hub in one commit; returns its URL."""
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
            )
        return info.commit_url

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | Path, *, revision: str | None = None, token: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> OuterModule:  # fmt: skip
        """Rebuild the outer module saved in a folder, or in a Hub repo ``name_or_path`` at ``revision`` (its
        class is read from the config)."""
        directory = resolve_folder(name_or_path, (CONFIG_NAME, WEIGHTS_NAME), revision, token, cache_dir)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"{directory} holds no outer variables: expected {CONFIG_NAME} and {WEIGHTS_NAME} (written by "
                "BilevelTrainer.save_model or OuterModule.save_pretrained)."
            )
        try:
            config = json.loads(config_path.read_text())
            kind = config.pop("type")
            with torch.device("meta"):  # the declared sizes, checked against the file before anything is allocated
                shapes = {name: tuple(t.shape) for name, t in OUTER_TYPES.get(kind)(**config).state_dict().items()}
            state = load_file(str(weights_path))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError, OSError) as error:
            raise ValueError(
                f"Could not load the outer variables in {directory}: {error!r}. The files are corrupt or from an "
                "incompatible version; restore them from an earlier checkpoint."
            ) from error
        found = {name: tuple(t.shape) for name, t in state.items()}
        optional = OUTER_TYPES[kind].optional_state
        shapes = {name: shape for name, shape in shapes.items() if name in found or name not in optional}
        if found != shapes:
            raise ValueError(
                f"{directory}: {CONFIG_NAME} declares tensors {shapes} but {WEIGHTS_NAME} holds {found}. The files "
                "do not belong together; restore them from one save."
            )
        bad = [
            name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()
        ]
        if bad:
            raise ValueError(f"{directory}: {bad} hold NaN or inf values; restore them from an earlier checkpoint.")
        if cls is not OuterModule and kind in OUTER_TYPES and not issubclass(OUTER_TYPES[kind], cls):
            raise TypeError(f"{directory} holds a {kind}, not a {cls.__name__}.")
        module = OUTER_TYPES[kind](**config)
        module.load_state_dict(state)
        return module


def resolve_folder(name_or_path, filenames, revision=None, token=None, cache_dir=None) -> Path:
    """A local folder as is; otherwise a Hub repo id whose ``filenames`` are downloaded (cached) at ``revision``."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        paths = [hf_hub_download(str(name_or_path), name, revision=revision, token=token, cache_dir=cache_dir)
                 for name in filenames]  # fmt: skip
    except (HFValidationError, EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise FileNotFoundError(
            f"{name_or_path} is neither a local folder nor a Hub repo holding {list(filenames)} "
            f"(revision {revision or 'main'}): {error}"
        ) from error
    return Path(paths[0]).parent


def normalized_entropy(probs: torch.Tensor) -> float:
    """Entropy of a distribution divided by log(size): 1 for uniform, 0 for a point mass."""
    if probs.numel() < 2:
        return 1.0
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum()
    return float(entropy / math.log(probs.numel()))


def softmax_regularizer(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """KL(softmax(logits) ‖ uniform) = log N − H, or ½‖logits‖²."""
    if kind == "kl_uniform":
        log_probs = torch.log_softmax(logits, dim=0)
        return (log_probs.exp() * log_probs).sum() + math.log(logits.numel())
    if kind == "l2":
        return 0.5 * logits.pow(2).sum()
    raise ValueError(f"weight_regularization={kind!r} is not known; use 'none', 'kl_uniform' or 'l2'.")


def require_columns(dataset, columns, role: str, owner: str):
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {role} dataset has no column {missing} that {owner} reads (columns: {dataset.column_names}). "
            f"Add it, or pass the column's name to {owner}(...)."
        )
