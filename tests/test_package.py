"""The installable package (pyproject.toml): its wheel holds the library, the launch programs and
the configs, with one command per program; an installed command is `python -m launch.<name>`."""

import email
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_multihost import REPO

PACKAGES = ("t5g2", "launch", "configs")
# what the build reads besides the packages: the project, its dependencies, its readme
BUILD_FILES = ("pyproject.toml", "requirements.txt", "README.md")
TIMEOUT_S = 120


def _source_packages() -> set[str]:
    """The checkout's packages: every directory of PACKAGES with an __init__.py, dotted."""
    return {".".join(init.parent.relative_to(REPO).parts)
            for name in PACKAGES for init in (REPO / name).rglob("__init__.py")}


def _programs() -> set[str]:
    """launch/ modules that run as programs (an `if __name__ == "__main__":` block)."""
    return {path.stem for path in (REPO / "launch").glob("*.py")
            if re.search(r'^if __name__ == "__main__":', path.read_text(), re.M)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the sources (the checkout stays clean), offline: the
    environment's setuptools, no index."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in BUILD_FILES:
        shutil.copy(REPO / name, src / name)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = (tmp / "dist").glob("t5g2-*.whl")
    with zipfile.ZipFile(path) as wheel:
        yield wheel


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if re.fullmatch(rf"t5g2-[^/]+\.dist-info/{name}", n)]
    return wheel.read(path).decode()


def test_the_wheel_holds_every_package_module_and_launch_script(wheel):
    names = set(wheel.namelist())
    packages = {".".join(Path(n).parent.parts) for n in names if n.endswith("/__init__.py")}
    assert packages == _source_packages()
    assert {"t5g2", "t5g2.model", "t5g2.train", "launch", "configs"} <= packages
    for name in PACKAGES:
        for module in (REPO / name).rglob("*.py"):
            if "__pycache__" not in module.parts:
                assert str(module.relative_to(REPO)) in names
    # read by the Python launchers and the README's commands beside the modules
    assert {"launch/slurm_gpu.sbatch", "launch/tpu_vm.sh"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_the_wheel_declares_one_command_per_launch_program(wheel):
    scripts = {}
    section = None
    for line in _dist_info(wheel, "entry_points.txt").splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and section == "console_scripts":
            command, target = (part.strip() for part in line.split("="))
            scripts[command] = target
    expected = {f"t5g2-{module.replace('_', '-')}": f"launch.scripts:{module}"
                for module in _programs()}
    assert {"t5g2-train", "t5g2-export", "t5g2-sweep"} <= expected.keys()
    assert scripts == expected


def test_the_wheel_requires_requirements_txt_and_offers_the_extras(wheel):
    metadata = email.message_from_string(_dist_info(wheel, "METADATA"))
    assert metadata["Name"] == "t5g2"
    assert set(metadata.get_all("Provides-Extra")) == {"seqio", "test", "gpu", "tpu"}
    requires = metadata.get_all("Requires-Dist")
    always = {re.split(r"[\[<>=;\s]", r)[0].lower() for r in requires if "extra ==" not in r}
    listed = {re.split(r"[\[<>=#\s]", line)[0].lower()
              for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert always == listed and {"jax", "flax", "absl-py"} <= always
    assert "seqio" not in always and "tensorflow" not in always  # the seqio extra brings them
    assert any(r.startswith("seqio") and 'extra == "seqio"' in r for r in requires)


def test_an_installed_command_is_python_m_launch(tmp_path):
    """t5g2-train, as ./run.sh's editable install put it beside the interpreter, run outside the
    checkout, prints the same help with the same status as `python -m launch.train`."""
    command = Path(sys.executable).parent / "t5g2-train"
    assert command.is_file(), f"{command}: not installed; run ./run.sh test or pip install -e ."
    installed = subprocess.run([str(command), "--help"], cwd=tmp_path, capture_output=True,
                               text=True, timeout=TIMEOUT_S)
    module = subprocess.run([sys.executable, "-m", "launch.train", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert "--config: config file" in installed.stdout
    assert "--workdir: directory for metrics and checkpoints" in installed.stdout
    assert (installed.returncode, installed.stdout) == (module.returncode, module.stdout)
