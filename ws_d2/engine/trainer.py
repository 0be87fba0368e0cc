"""WSTrainer: DefaultTrainer with micro-batches, CPU/Gloo DDP, AMP checks and ws_d2's checkpointer, in a
constructor of its own (DefaultTrainer's hard-codes SimpleTrainer/AMPTrainer and DetectionCheckpointer)."""

import json
import logging
import os
import weakref

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import WSCheckpointer
from ..data.coco import check_datasets, gc_paused
from ..errors import ConfigError
from .micro_batch import MicroBatchTrainer, micro_batch_size


def check_trainable(cfg, world_size):
    """Refuse, in one line, before anything is built, a config that cannot train on `world_size` processes."""
    micro_batch_size(cfg, world_size)
    precision, device = cfg.SOLVER.AMP.PRECISION, str(cfg.MODEL.DEVICE)
    if cfg.SOLVER.AMP.ENABLED and precision not in ("float16", "bfloat16"):
        raise ConfigError(f"SOLVER.AMP.PRECISION must be float16 or bfloat16, got {precision!r}")
    # the CPU's float16 convolutions are emulated, several times slower than fp32 (docs/TRAINING.md)
    if cfg.SOLVER.AMP.ENABLED and precision == "float16" and not device.startswith("cuda"):
        raise ConfigError(
            f"SOLVER.AMP.ENABLED needs a CUDA device for SOLVER.AMP.PRECISION float16 (MODEL.DEVICE is "
            f"'{device}'); on the CPU use SOLVER.AMP.PRECISION bfloat16"
        )


class WSTrainer(DefaultTrainer):
    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):  # setup_logger not called yet
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        check_trainable(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # detectron2 (main too) gives DDP device_ids=[local rank] by default, which a CPU model must not get
        device_ids = [comm.get_local_rank()] if next(model.parameters()).is_cuda else None
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
        precision = getattr(torch, cfg.SOLVER.AMP.PRECISION) if cfg.SOLVER.AMP.ENABLED else None
        # as detectron2's AMPTrainer: float16 scales the loss, bfloat16 has fp32's range and needs no scaler
        scaler = (
            torch.amp.GradScaler(torch.device(cfg.MODEL.DEVICE).type) if precision == torch.float16 else None
        )
        bcn = cfg.MODEL.BCN
        min_speed = bcn.MIN_MOVING_SPEED if bcn.ENABLED and bcn.ESTIMATE else None
        self._trainer = MicroBatchTrainer(
            model, data_loader, optimizer, cfg.SOLVER.ITER_SIZE, scaler, min_speed, precision
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = WSCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # detectron2 v0.6's DefaultTrainer checkpoints no state of its _trainer (main's does): without these,
    # --resume would restart the optimizer's momentum and the GradScaler's scale
    def state_dict(self):
        return {**super().state_dict(), "_trainer": self._trainer.state_dict()}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # absent from checkpoints written before
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's train loader, batched per micro-batch: IMS_PER_BATCH / ITER_SIZE over all processes."""
        micro_cfg = cfg.clone()
        micro_cfg.defrost()
        micro_cfg.SOLVER.IMS_PER_BATCH = micro_batch_size(cfg, comm.get_world_size()) * comm.get_world_size()
        with gc_paused():  # the data set's records: millions of objects until they are serialized
            loader = super().build_train_loader(micro_cfg)
        check_datasets(cfg)  # a COCO set's classes are known once it is loaded
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        loader = super().build_test_loader(cfg, dataset_name)
        check_datasets(cfg, train=False)
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        """COCO box (and mask) AP, and on a panoptic-separated set the semantic head's mIoU (not PQ);
        detections are kept in OUTPUT_DIR/inference/<data set>/."""
        output_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        coco = COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=cfg.TEST.FAST_COCO_EVAL)
        if MetadataCatalog.get(dataset_name).get("evaluator_type") != "coco_panoptic_seg":
            return coco
        return DatasetEvaluators([coco, SemSegEvaluator(dataset_name, output_dir=output_dir)])

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test, with the metrics also written to OUTPUT_DIR/eval_results.json."""
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            with open(os.path.join(cfg.OUTPUT_DIR, "eval_results.json"), "w") as f:
                json.dump(results, f, indent=2)
        return results
