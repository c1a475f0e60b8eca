"""The wheel works on its own: built from a copy of the sources, installed into a fresh
venv, and run from a directory outside the checkout, `chipshift` finds its shipped recipes
and data files. The heavy dependencies (torch, transformers, ...) and the data packages are
borrowed from this interpreter's site-packages through a .pth line, which appends that
folder to sys.path without running the .pth files inside it (so this checkout's editable
install cannot leak in)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def source_dir(package: str) -> Path:
    """Where a listed package's files live in the checkout (package-dir maps chipshift.recipes
    to the top-level recipes/)."""
    mapped = SETUPTOOLS.get("package-dir", {}).get(package)
    return ROOT / mapped if mapped else ROOT.joinpath(*package.split("."))


def installed_files() -> set[Path]:
    """Every file the wheel must hold, as a path under the installed chipshift/: the checkout's
    modules and data files under chipshift/, and the shipped recipes."""
    pkg = ROOT / "chipshift"
    files = {p.relative_to(pkg) for p in pkg.rglob("*")
             if p.is_file() and p.suffix != ".pyc" and "__pycache__" not in p.parts}
    return files | {Path("recipes") / p.name for p in (ROOT / "recipes").glob("*.toml")}


def test_package_list_and_data_cover_exactly_what_exists():
    listed = set(SETUPTOOLS["packages"])
    present = {".".join(p.relative_to(ROOT).parts) for p in (ROOT / "chipshift").rglob("*")
               if p.is_dir() and "__pycache__" not in p.parts and any(p.glob("*.py"))}
    assert present | {"chipshift", "chipshift.recipes"} == listed, "pyproject.toml's packages"
    for package, patterns in SETUPTOOLS["package-data"].items():
        for pattern in patterns:
            assert list(source_dir(package).glob(pattern)), f"package-data {package}: {pattern!r} matches no file"
    data = {p.relative_to(ROOT / "chipshift") for pattern in SETUPTOOLS["package-data"]["chipshift"]
            for p in (ROOT / "chipshift").glob(pattern)}
    assert {p for p in installed_files() if p.suffix != ".py" and p.parts[0] != "recipes"} == data


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with only the wheel installed, plus this interpreter's site-packages on the path."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for folder in ("chipshift", "recipes"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp / "dist")],
                   check=True, timeout=120)
    wheel, = (tmp / "dist").glob("chipshift-*.whl")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=60)
    python = env_dir / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=120)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return env_dir


def chipshift(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.any_class
def test_wheel_runs_outside_the_checkout(venv, tmp_path, tiny_tokenizer_dir):
    where = chipshift(venv, tmp_path, "python", "-c", "import chipshift; print(chipshift.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)
    installed = Path(where).parent
    for rel in installed_files():
        assert (installed / rel).is_file(), f"{rel} is not in the wheel"

    assert "run" in chipshift(venv, tmp_path, "chipshift", "--help").stdout

    demo = tomllib.loads((ROOT / "recipes" / "demo.toml").read_text())
    for recipe in ("demo", "recipes/demo.toml"):  # by name, and by the path the README gives
        out = chipshift(venv, tmp_path, "chipshift", "run", recipe, "--check").stdout
        assert "recipe demo: valid" in out
        assert all(f"  {stage} " in out for stage in demo["stages"]), out

    plan = chipshift(venv, tmp_path, "chipshift", "plan", "--model", "tiny", "--tokens", "1e9", "--chip", "h100-sxm",
                     "--count", "1").stdout
    assert "H100" in plan

    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=48, max_position_embeddings=32)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_tokenizer_dir / name, tmp_path / "hf" / name)
    chipshift(venv, tmp_path, "chipshift", "import", "hf", "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and (tmp_path / "ckpt" / "chipshift.json").is_file()


def test_wheel_reports_the_devices_and_their_precision_policy(venv, tmp_path):
    out = chipshift(venv, tmp_path, "chipshift", "devices").stdout
    assert "cpu" in out and "precision policy on cpu" in out
