"""The built wheel carries the recipes and accelerate configs, and `hf-fg2u train --recipe` runs from a fresh venv
outside the repository (no PYTHONPATH, no checkout)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "outputs", "*.egg-info", "__pycache__", ".*cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (the build's own folders stay out of the repository)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = shutil.copytree(ROOT, tmp / "source", ignore=SKIP)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return next(tmp.glob("hf_fg2u-*.whl"))


def test_wheel_ships_recipes_and_accelerate_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"hf_fg2u/recipes/{name}.yaml" for name in ("noisy_reweighting", "domain_mixture", "soft_prompt")}
    configs = {f"hf_fg2u/recipes/accelerate_configs/{name}.yaml" for name in ("cpu_2proc", "multi_gpu", "single_gpu")}
    assert recipes | configs <= names
    assert not any(name.startswith("tests/") for name in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hf-fg2u = hf_fg2u.cli.main:main" in entry_points


@pytest.mark.slow
def test_installed_wheel_runs_a_packaged_recipe_from_any_directory(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The fresh venv sees this interpreter's dependencies (torch, transformers, ...) through a .pth file, not
    # the checkout: the package itself comes only from the wheel (--ignore-installed: the shared environment may
    # hold an editable install, which must be neither used nor touched).
    venv_site = next((venv / "lib").glob("python*/site-packages"))
    (venv_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--ignore-installed", "-q", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [str(venv / "bin" / "hf-fg2u"), "train", "--recipe", "noisy_reweighting", "--max_steps", "2",
         "--compare_uniform", "false", "--plot", "false"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "outputs" / "noisy_reweighting" / "outer_model.safetensors").is_file()
    assert str(venv) in subprocess.run(
        [str(python), "-c", "import hf_fg2u; print(hf_fg2u.__file__)"], cwd=work, env=env, capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
