"""Repository hygiene: nothing of detectron2's sources is committed."""

import subprocess

import pytest


def tracked_files(repo_root):
    try:
        out = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_no_detectron2_sources_tracked(repo_root):
    files = tracked_files(repo_root)
    assert files, "git ls-files returned nothing"
    assert not [f for f in files if f.startswith("detectron2/") or "/detectron2/" in f]
    for f in files:
        if f.endswith(".py"):
            head = (repo_root / f).read_text(errors="ignore")[:300]
            assert "Copyright (c) Facebook" not in head, f"{f} looks copied from detectron2"
