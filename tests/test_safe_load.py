"""Safe checkpoint reading (no code from files runs) and WSCheckpointer's atomic saving."""

import collections
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from checkpoint_files import RunsShellCommand
from detectron2.checkpoint import detection_checkpoint

from ws_d2.checkpoint import WSCheckpointer, load_checkpoint_file
from ws_d2.errors import CheckpointError, UnsafeCheckpointError


def _arrays():
    rng = np.random.default_rng(0)
    return collections.OrderedDict(
        [("conv.weight", rng.standard_normal((4, 3, 3, 3)).astype(np.float32)), ("step", np.int64(7))]
    )


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pkl_of_numpy_arrays_reads(tmp_path, protocol):
    path = tmp_path / "w.pkl"
    data = {"model": _arrays(), "__author__": "test", "raw": b"\x00\xff", "names": ("a", "b"), "n": 1.5}
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_checkpoint_file(path)
    np.testing.assert_array_equal(loaded["model"]["conv.weight"], data["model"]["conv.weight"])
    assert loaded["model"]["step"] == 7 and loaded["raw"] == b"\x00\xff" and loaded["names"] == ("a", "b")


def test_pkl_written_by_numpy_1x_reads(tmp_path):
    # numpy 1.x pickles name numpy.core.multiarray; numpy 2.x renamed it numpy._core.
    blob = pickle.dumps(_arrays(), protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in blob
    (tmp_path / "old.pkl").write_bytes(blob)
    assert load_checkpoint_file(tmp_path / "old.pkl")["conv.weight"].shape == (4, 3, 3, 3)


class _Python2StylePickler(pickle._Pickler):
    """Writes bytes as Python 2 str opcodes (BINSTRING), as Detectron's cPickle .pkl files have them."""

    def save_bytes(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def test_python2_detectron_pkl_reads(tmp_path):
    buffer = io.BytesIO()
    _Python2StylePickler(buffer, protocol=2).dump({"blobs": _arrays()})
    blob = buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"_codecs" not in blob and pickle.BINSTRING in blob
    (tmp_path / "py2.pkl").write_bytes(blob)
    loaded = load_checkpoint_file(tmp_path / "py2.pkl")["blobs"]
    np.testing.assert_array_equal(loaded["conv.weight"], _arrays()["conv.weight"])


def test_pth_with_numpy_values_reads(tmp_path):
    torch.save(
        {"model": {"w": torch.ones(2)}, "meta": {"a": np.arange(3.0), "s": np.float32(1.5)}},
        tmp_path / "np.pth",
    )
    loaded = load_checkpoint_file(tmp_path / "np.pth")
    np.testing.assert_array_equal(loaded["meta"]["a"], np.arange(3.0))
    assert loaded["meta"]["s"] == np.float32(1.5) and torch.equal(loaded["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_crafted_file_is_refused_and_runs_nothing(tmp_path, suffix):
    marker = tmp_path / "was_executed"
    path = tmp_path / f"evil{suffix}"
    payload = {"model": {"w": np.zeros(2)}, "x": RunsShellCommand(marker)}
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save({"model": {"w": torch.zeros(2)}, "x": RunsShellCommand(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "system" in message
    assert not marker.exists()
    # the same file through the checkpointer: refused too, and detectron2's module is left as it was
    with pytest.raises(UnsafeCheckpointError):
        WSCheckpointer(torch.nn.Linear(2, 2)).load(str(path))
    assert not marker.exists()
    assert detection_checkpoint.pickle is pickle and detection_checkpoint.torch is torch


def test_unlisted_builtin_and_non_latin1_codec_are_refused(tmp_path):
    path = tmp_path / "eval.pkl"
    path.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")  # protocol 0: eval("1+1")
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        load_checkpoint_file(path)
    path.write_bytes(b"c_codecs\nencode\n(S'abc'\nS'rot13'\ntR.")
    with pytest.raises(CheckpointError):
        load_checkpoint_file(path)


@pytest.mark.parametrize("suffix", [".pkl", ".pth", ".pth.tar"])
def test_truncated_file_gives_named_error(tmp_path, suffix):
    path = tmp_path / f"cut{suffix}"
    model = {"model": {"w": torch.randn(64, 64)}}
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"model": {"w": np.zeros((64, 64))}}))
    else:
        torch.save(model, path, _use_new_zipfile_serialization=suffix == ".pth")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert (
        str(path) in str(info.value)
        and "truncated or corrupt" in str(info.value)
        and "\n" not in str(info.value)
    )


def test_not_a_dict_and_missing_file(tmp_path):
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match="dict"):
        load_checkpoint_file(tmp_path / "list.pkl")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint_file(tmp_path / "absent.pth")


def test_checkpointer_keeps_detectron2_loading_rules(tmp_path):
    model = torch.nn.Linear(3, 2)
    weights = {k: v.detach().numpy() + 1 for k, v in model.state_dict().items()}
    # ws_d2/detectron2 layout: exact names, no heuristics
    path = tmp_path / "d2.pkl"
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "ws_d2", "matching_heuristics": False}))
    WSCheckpointer(model).load(str(path))
    np.testing.assert_array_equal(model.weight.detach().numpy(), weights["weight"])
    # a bare dict in a .pkl is a Detectron (Caffe2) file for detectron2: its name-matching heuristics apply
    (tmp_path / "c2.pkl").write_bytes(pickle.dumps({"blobs": {"weight": weights["weight"], "x_momentum": 0}}))
    checkpoint = WSCheckpointer(model)._load_file(str(tmp_path / "c2.pkl"))
    assert checkpoint["__author__"] == "Caffe2" and checkpoint["matching_heuristics"]
    assert set(checkpoint["model"]) == {"weight"}
    # a bare state_dict in a .pth is wrapped as {"model": ...}
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    assert set(WSCheckpointer(model)._load_file(str(tmp_path / "bare.pth"))["model"]) == {"weight", "bias"}
    # pycls .pyth: its model_state, without BatchNorm step counters, with the heuristics
    pycls = {"model_state": {"weight": model.weight.detach(), "bn.num_batches_tracked": torch.tensor(3)}}
    torch.save(pycls, tmp_path / "net.pyth")
    checkpoint = WSCheckpointer(model)._load_file(str(tmp_path / "net.pyth"))
    assert checkpoint["__author__"] == "pycls" and set(checkpoint["model"]) == {"weight"}
    torch.save({"weight": model.weight.detach()}, tmp_path / "odd.pyth")
    with pytest.raises(CheckpointError, match="odd.pyth: .*model_state"):
        WSCheckpointer(model)._load_file(str(tmp_path / "odd.pyth"))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = WSCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_a", iteration=1)
    good = (tmp_path / "model_a.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_a.pth"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model_a.pth").stat().st_mode & 0o777 == 0o666 & ~umask

    real_save = torch.save

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")  # some bytes reach the file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_a", iteration=2)  # overwriting the same name keeps the old content
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_b", iteration=2)
    monkeypatch.setattr(torch, "save", real_save)

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_a.pth"]  # no partial or temp files
    assert (tmp_path / "model_a.pth").read_bytes() == good
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_a.pth")
    assert WSCheckpointer(torch.nn.Linear(3, 2), save_dir=str(tmp_path)).resume_or_load("")["iteration"] == 1

    checkpointer.save("model_b", iteration=3)
    assert (tmp_path / "last_checkpoint").read_text() == "model_b.pth"
    assert load_checkpoint_file(tmp_path / "model_b.pth")["iteration"] == 3
