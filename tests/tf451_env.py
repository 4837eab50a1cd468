"""A second virtualenv with transformers 4.51 (the official Eagle code's pin), built once and cached.

``python -m venv`` at ``$MEGATRON_EAGLE_TF451_VENV`` (default ``<repo>/.venv-tf451``), then
``pip install transformers==4.51.3 'tokenizers<0.22'`` from PyPI. torch, Pillow and the rest come
from the running interpreter's site-packages through a ``.pth`` file placed after the install, so
the venv's own transformers/tokenizers/huggingface_hub shadow the main ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS = ("transformers==4.51.3", "tokenizers<0.22")
READY = "tf451.ready"


def venv_dir() -> Path:
    return Path(os.environ.get("MEGATRON_EAGLE_TF451_VENV", ROOT / ".venv-tf451"))


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def _stamp() -> str:
    return " ".join(PINS) + " on " + sysconfig.get_paths()["purelib"] + "\n"


def ensure_tf451_venv(timeout: float = 900) -> Path:
    """Build the venv unless it is there for these pins and this interpreter (raises CalledProcessError
    if pip cannot install). A file lock keeps parallel test processes from building it twice."""
    import fcntl

    d = venv_dir()
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f"{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (d / READY).exists() and (d / READY).read_text() == _stamp():
            return venv_python()
        return _build(d, timeout)


def _build(d: Path, timeout: float) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(d)], check=True, timeout=timeout)
    py = venv_python()
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS],
                   check=True, timeout=timeout)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "zz_main_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (d / READY).write_text(_stamp())
    return py


if __name__ == "__main__":
    print(ensure_tf451_venv())
