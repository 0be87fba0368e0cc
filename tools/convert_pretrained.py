#!/usr/bin/env python
"""Convert published GN+WS weights into a detectron2 checkpoint that ws_d2's configs load by exact name.

  python tools/convert_pretrained.py R-50-GN-WS.pth.tar pretrained/R-50-GN-WS.pkl
  python tools/convert_pretrained.py mask_rcnn_r50_fpn_gn_ws-all_2x_coco.pth mask_rcnn_R_50_FPN_gn_ws_2x.pkl
  python tools/convert_pretrained.py SRC DST --source torchvision --config-file my_frozen_bn_config.yaml

Sources (detected unless --source is given): the authors' ImageNet GN+WS ResNet/ResNeXt files and
MMDetection's re-hosted copies (-> backbone weights), MMDetection's trained GN+WS Faster/Mask R-CNN
(-> full models), torchvision BatchNorm ResNets (-> backbone of a BatchNorm config only). The file is read
without running code from it. Names and shapes are checked against the model built from --config-file, or
from the seed config of the architecture found in the file. DST ends in .pkl (numpy) or .pth (torch).
Exit status: 0 converted, 1 refused (the message names the keys), 2 usage error.
"""

import argparse
import os
import pickle
import re
import sys

import torch

import ws_d2

# isort: split
from ws_d2.checkpoint import SOURCES, convert_state_dict, load_checkpoint_file, meta_model
from ws_d2.checkpoint.layouts import common_prefix, detect_layout, unwrap_state_dict
from ws_d2.errors import CheckpointError, ConfigError, command_line
from ws_d2.files import atomic_write, refuse_output_onto_inputs
from ws_d2.model_zoo import get_config_file

DEPTH_OF_BLOCKS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}


def get_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint to convert (.pth, .pth.tar, .pt, .pkl)")
    parser.add_argument("dst", metavar="DST", help="output checkpoint (.pkl or .pth)")
    parser.add_argument("--source", default="auto", choices=("auto", *SOURCES), help="layout of SRC")
    parser.add_argument("--config-file", metavar="FILE", help="ws_d2 config whose model the result must fit")
    return parser


def infer_resnet_architecture(state_dict, prefix=""):
    """The architecture of a torchvision-style ResNet/ResNeXt state_dict, e.g. 'R_50' or 'X_101_32x4d': depth
    from the blocks of layer1-4, groups and width per group from layer1.0.conv2's shape."""
    blocks = [
        {int(m.group(1)) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}layer{i}\.(\d+)\.", k))}
        for i in (1, 2, 3, 4)
    ]
    counts = tuple(max(b) + 1 if b else 0 for b in blocks)
    kind = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in state_dict else "basic"
    depth = DEPTH_OF_BLOCKS.get((kind, counts))
    if depth is None:
        raise ValueError(f"blocks per stage {counts} ({kind}) match no ResNet depth")
    out_channels, per_group = state_dict[f"{prefix}layer1.0.conv2.weight"].shape[:2]
    if kind == "basic" or out_channels == per_group:
        return f"R_{depth}"
    return f"X_{depth}_{out_channels // per_group}x{per_group}d"


def seed_config_file(checkpoint, source):
    """The seed config whose model fits a loaded file in layout `source`: the GN+WS (or, for `authors_bcn`,
    BCN+WS) config of the ResNet/ResNeXt architecture the file holds, with a mask head if it has one."""
    state_dict = unwrap_state_dict(checkpoint)
    prefix = common_prefix(state_dict)
    mask_on = any(k[len(prefix) :].startswith("roi_head.mask_head.") for k in state_dict)
    resnet_prefix = prefix + ("backbone." if source == "mmdet" else "")
    try:
        architecture = infer_resnet_architecture(state_dict, prefix=resnet_prefix)
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"cannot infer the ResNet architecture from the file ({e}): pass --config-file"
        ) from None
    if source == "authors_bcn":
        name = f"COCO-InstanceSegmentation/mask_rcnn_{architecture}_FPN_bcn_ws_2x.yaml"
    elif mask_on:
        name = f"COCO-InstanceSegmentation/mask_rcnn_{architecture}_FPN_gn_ws_2x.yaml"
    else:
        name = f"COCO-Detection/faster_rcnn_{architecture}_FPN_gn_ws_1x.yaml"
    try:
        return get_config_file(name)
    except ConfigError:
        raise CheckpointError(
            f"no ws_d2 seed config {name} for this {architecture} file: pass --config-file"
        ) from None


def save_converted(state_dict, path):
    """Write ``{"model": ..., "__author__": "ws_d2", "matching_heuristics": False}`` (exact names: detectron2
    must not rename anything) as ``.pkl`` (numpy arrays) or ``.pth`` (tensors), atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    pkl = os.fspath(path).endswith(".pkl")
    data = {"model": {k: v.numpy() for k, v in tensors.items()} if pkl else tensors}
    data.update(__author__="ws_d2", matching_heuristics=False)
    with atomic_write(path) as f:
        if pkl:
            pickle.dump(data, f, protocol=4)
        else:
            torch.save(data, f)


def convert(src, dst, source="auto", config_file=None):
    """Read SRC safely, convert it for the model of `config_file` (default: the seed config of the file's
    architecture), write DST. Returns the ConversionReport; raises CheckpointError naming the keys."""
    if not os.fspath(dst).endswith((".pkl", ".pth")):
        raise CheckpointError(f"{dst}: the output must end in .pkl or .pth")
    refuse_output_onto_inputs(dst, [src, config_file], option="DST")
    checkpoint = load_checkpoint_file(src)
    if source == "auto":
        if "model" in checkpoint and "__author__" in checkpoint:
            raise CheckpointError(
                f"{src}: already a detectron2 checkpoint (written by {checkpoint['__author__']})"
            )
        source = detect_layout(unwrap_state_dict(checkpoint))
        if source is None:
            raise CheckpointError(f"{src}: not a known layout ({', '.join(SOURCES)}); pass --source")
    config_file = config_file or seed_config_file(checkpoint, source)
    model = meta_model(ws_d2.load_config(config_file))
    state_dict, report = convert_state_dict(checkpoint, model, source, target=os.path.basename(config_file))
    save_converted(state_dict, dst)
    return report


@command_line("convert_pretrained")
def main(argv=None):
    args = get_parser().parse_args(argv)
    report = convert(args.src, args.dst, source=args.source, config_file=args.config_file)
    print(report.summary())
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
