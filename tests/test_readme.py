"""The README's Python quickstart runs as written (issue 23 item 6)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> str:
    """The first ```python block after the "Train with `BilevelTrainer`" heading."""
    text = README.read_text()
    section = text[text.index("## Train with `BilevelTrainer`") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs(tmp_path, monkeypatch, one_thread):
    code = quickstart()
    # Only the budget changes: 90 outer steps of 16 directions would take a minute here.
    fast = code.replace("max_steps=90", "max_steps=2").replace("num_directions=16", "num_directions=2")
    assert fast.count("max_steps=2") == 1 and fast.count("num_directions=2") == 1
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(fast, str(README), "exec"), namespace)  # noqa: S102 - the README's own code
    trainer, weighted = namespace["trainer"], namespace["weighted"]
    assert trainer.state.global_step == 2 and (tmp_path / "out" / "outer_model.safetensors").is_file()
    assert weighted.column_names[-1] == "weight" and len(weighted) == len(namespace["train"]) == 96
    assert torch.isfinite(torch.tensor(weighted["weight"])).all()
