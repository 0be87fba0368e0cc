"""Inference set-up: the config from a file, and DefaultPredictor with weights read by WSCheckpointer."""

import logging
import os

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor

from ws_d2.checkpoint import WSCheckpointer
from ws_d2.config import get_ws_cfg
from ws_d2.modeling import fold_ws

__all__ = ["WSPredictor", "check_weights_file", "load_inference_cfg", "metadata_for"]


def load_inference_cfg(config_file, opts=(), confidence_threshold=None):
    """A frozen ws_d2 config from `config_file` and `KEY VALUE` overrides, checked for missing files.

    `confidence_threshold` sets the test score threshold of every detector head, as detectron2's demo does.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    cfg = get_ws_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if confidence_threshold is not None:
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = confidence_threshold
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = confidence_threshold
        cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = confidence_threshold
    cfg.freeze()
    check_weights_file(cfg.MODEL.WEIGHTS)
    return cfg


def check_weights_file(weights):
    """Name a missing local MODEL.WEIGHTS file (fvcore would fail with a bare assertion)."""
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS file not found: {weights}")


def metadata_for(cfg):
    """The test set's metadata (class names, colors, COCO category ids); empty if DATASETS.TEST is."""
    return MetadataCatalog.get(cfg.DATASETS.TEST[0]) if len(cfg.DATASETS.TEST) else Metadata()


class WSPredictor(DefaultPredictor):
    """detectron2's DefaultPredictor (BGR image in, the model's output dict out; resizing and INPUT.FORMAT
    handled by DefaultPredictor.__call__) whose weights are read by WSCheckpointer.

    DefaultPredictor's own loading uses DetectionCheckpointer, which unpickles files without restriction,
    so it is given a config without weights and WSCheckpointer then loads cfg.MODEL.WEIGHTS.
    `fold=True` replaces the WS convs by plain convs holding the standardized weights: identical outputs.
    """

    def __init__(self, cfg, fold=False):
        check_weights_file(cfg.MODEL.WEIGHTS)
        no_weights = cfg.clone()
        no_weights.defrost()
        no_weights.MODEL.WEIGHTS = ""
        # fvcore would log "No checkpoint found. Initializing model from scratch" for the empty weights
        # just before WSCheckpointer loads the real ones: keep the log truthful.
        fvcore_log = logging.getLogger("fvcore.common.checkpoint")
        level = fvcore_log.level
        fvcore_log.setLevel(logging.WARNING)
        try:
            super().__init__(no_weights)
        finally:
            fvcore_log.setLevel(level)
        self.cfg = cfg.clone()
        self.metadata = metadata_for(cfg)
        WSCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        if fold:
            fold_ws(self.model)
