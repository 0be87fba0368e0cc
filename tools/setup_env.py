#!/usr/bin/env python3
"""Build ws_d2's Python environment: `make env` runs this with the machine's python3.

Steps, each named when it fails: create the venv (if missing), install torch, install detectron2 from
the package registry (unless the interpreter already has a full build with compiled ops), install
the rest of requirements.txt, install ws_d2 itself in editable mode. Standard library only: it runs
before anything else exists.

detectron2 on PyPI is `pb1-detectron2==0.6`, an sdist of v0.6's Python sources without `layers/csrc`:
its setup.py imports torch at build time and tries to compile the missing C++ files. We download the
sdist, empty its extension list, install its bundled model-zoo YAMLs as package data, and install it
with --no-deps, without the requirements only caffe2 and its formatter need (future, pydot, black).
ws_d2/compat.py fills in what the missing `detectron2._C` and today's libraries take away.
"""

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements.txt"


class SetupStepFailed(RuntimeError):
    pass


def run_step(name, cmd, **kwargs):
    print(f"[setup] {name}", flush=True)
    result = subprocess.run(cmd, **kwargs)
    if result.returncode != 0:
        raise SetupStepFailed(
            f"set-up step '{name}' failed (exit {result.returncode}): {' '.join(map(str, cmd))}"
        )


def read_requirements():
    reqs = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return reqs


def pick(reqs, name):
    return next(r for r in reqs if re.split(r"[=<>!~ ]", r, maxsplit=1)[0].lower() == name)


def python_can(python, code):
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def patch_detectron2_setup(setup_py: Path):
    """Make the sdist installable as pure Python, keeping its model-zoo YAMLs as package data."""
    text = setup_py.read_text()
    text = text.replace("ext_modules=get_extensions(),", "ext_modules=[],")
    text = text.replace(
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    )
    # caffe2's helpers (future, pydot) and a pinned formatter (black) are not needed at run time; left in,
    # pip reports them as missing dependencies after every later install
    for requirement in ('"future",', '"pydot",', '"black==21.4b2",'):
        text = text.replace(requirement, "", 1)
    if "ext_modules=[]," not in text or '"configs/**/*.yaml"' not in text or '"pydot"' in text:
        raise SetupStepFailed("set-up step 'patch detectron2 setup.py' failed: its layout changed")
    setup_py.write_text(text)


def install_detectron2(python, requirement):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # torch is already in the interpreter; the sdist's setup.py imports it to compute metadata.
        run_step(
            f"download {requirement}",
            [
                python,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--no-binary",
                ":all:",
                "-d",
                str(tmp),
                requirement,
            ],
        )
        (sdist,) = list(tmp.glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        (src,) = [p for p in tmp.iterdir() if p.is_dir()]
        patch_detectron2_setup(src / "setup.py")
        run_step(
            "install detectron2 (pure Python)",
            [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=str(REPO / ".venv"), help="venv to create (ignored with --python)")
    parser.add_argument("--python", help="use this interpreter as it is instead of a venv")
    args = parser.parse_args()

    try:
        if args.python:
            python = args.python
        else:
            venv = Path(args.venv)
            python = str(venv / "bin" / "python")
            if not Path(python).exists():
                run_step("create venv", [sys.executable, "-m", "venv", str(venv)])
        reqs = read_requirements()
        torch_reqs = [pick(reqs, "torch"), pick(reqs, "torchvision")]
        d2_req = pick(reqs, "pb1-detectron2")
        rest = [r for r in reqs if r not in torch_reqs and r != d2_req]
        # no byte-compiling of every installed file (torch has thousands): Python compiles what it imports
        pip = [python, "-m", "pip", "install", "-q", "--no-compile"]

        if python_can(python, "import torch, torchvision"):
            print("[setup] torch and torchvision already installed", flush=True)
        else:
            run_step("install torch", pip + torch_reqs)
        if python_can(python, "import detectron2._C"):
            print("[setup] full detectron2 (with compiled ops) found: used as it is", flush=True)
        elif python_can(python, "import importlib.util as u; assert u.find_spec('detectron2')"):
            print("[setup] detectron2 (pure Python) already installed", flush=True)
        else:
            install_detectron2(python, d2_req)
        run_step("install requirements", pip + rest)
        run_step("install ws_d2", pip + ["--no-deps", "--no-build-isolation", "-e", str(REPO)])
        run_step(
            "check imports",
            [
                python,
                "-c",
                "import ws_d2, cv2, pycocotools, fvcore; from detectron2.modeling import build_model",
            ],
        )
    except SetupStepFailed as e:
        print(f"[setup] ERROR: {e}", file=sys.stderr)
        return 1
    print("[setup] done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
