"""tools/lazyconfig_train_net.py: trains a Python config's model with ws_d2's trainer pieces (micro-batches,
checked data, safe checkpoints), resumes it, and refuses bad input in one line before any model is built."""

import json

import pytest
import torch

MASK_RCNN = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.py"


def tiny_run(output_dir, prefix):
    """Overrides that train the R-50 GN+WS Mask R-CNN on the tiny 64 px set, from random weights, on the CPU."""
    return [
        f"train.output_dir={output_dir}", "train.init_checkpoint=", "train.device=cpu", "train.log_period=1",
        f"dataloader.train.dataset.names={prefix}_train", f"dataloader.test.dataset.names={prefix}_val",
        "dataloader.train.total_batch_size=2", "train.iter_size=2", "model.roi_heads.num_classes=3",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.test.mapper.augmentations.0.short_edge_length=64",
        "model.proposal_generator.post_nms_topk=[64,64]", "model.roi_heads.batch_size_per_image=32",
    ]  # fmt: skip


def iterations(output_dir):
    with open(output_dir / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    return [r["iteration"] for r in records if "total_loss" in r], [
        r["total_loss"] for r in records if "total_loss" in r
    ]


@pytest.mark.slow
def test_trains_checkpoints_and_resumes(tmp_path, repo_root, tiny_dataset, load_tool):
    tiny_dataset(tmp_path / "data", "lazy_tiny", num_train=2, num_val=1)
    tool, output_dir = load_tool("lazyconfig_train_net"), tmp_path / "run"
    opts = tiny_run(output_dir, "lazy_tiny")
    config = str(repo_root / MASK_RCNN)
    assert tool.run(["--config-file", config, *opts, "train.max_iter=4", "train.checkpointer.period=2"]) == 0
    assert {p.name for p in output_dir.glob("*.pth")} == {
        "model_0000001.pth",
        "model_0000003.pth",
        "model_final.pth",
    }
    assert (output_dir / "last_checkpoint").read_text() == "model_final.pth"
    # the end of training evaluated the model on the val set
    done, losses = iterations(output_dir)
    assert done == [0, 1, 2, 3] and all(0 < loss < 100 for loss in losses)
    # a finished run is not overwritten; --resume continues it from the iteration after its checkpoint
    assert tool.run(["--config-file", config, *opts, "train.max_iter=6"]) == 1
    assert tool.run(["--config-file", config, "--resume", *opts, "train.max_iter=6"]) == 0
    assert iterations(output_dir)[0] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "opts, message",
    [
        (["dataloader.train.dataset.names=no_such_set"], "data set 'no_such_set' is not registered"),
        (["model.roi_heads.num_classes=80"], "has 3 categories but model.roi_heads.num_classes is 80"),
        (["train.iter_size=3"], "dataloader.train.total_batch_size 2 does not divide into 1 process(es) x"),
        (["train.init_checkpoint=missing.pkl"], "train.init_checkpoint file not found: missing.pkl"),
        (["train.device=cuda:0"], "train.device is cuda:0 but CUDA is not available"),
    ],
)
def test_bad_input_is_refused_in_one_line(
    tmp_path, repo_root, tiny_dataset, load_tool, capsys, opts, message
):
    if "cuda" in opts[0] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    tiny_dataset(tmp_path / "data", "lazy_refused", num_train=1, num_val=1)
    argv = ["--config-file", str(repo_root / MASK_RCNN), *tiny_run(tmp_path / "run", "lazy_refused"), *opts]
    assert load_tool("lazyconfig_train_net").run(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("lazyconfig_train_net: error: ") and message in err and err.count("\n") == 1, err


def test_a_yaml_config_is_sent_to_train_net(repo_root, load_tool, capsys):
    yaml_config = str(repo_root / MASK_RCNN.replace(".py", ".yaml"))
    assert load_tool("lazyconfig_train_net").run(["--config-file", yaml_config]) == 1
    assert "(YAML configs: tools/train_net.py)" in capsys.readouterr().err
