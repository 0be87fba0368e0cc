"""The Python (LazyConfig) configs against their YAML twins: `LazyConfig.load` + `instantiate` build the YAML's
model (state_dict keys and shapes, WS on the same convs, the same outputs and losses for the same weights) and
its training recipe (optimizer groups, LR schedule, data augmentation, batch, weights)."""

import detectron2.data.transforms as T
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetMapper
from detectron2.layers import Conv2d
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils.events import EventStorage

import ws_d2
from ws_d2.data import synthetic_batch
from ws_d2.layers import WSConv2d
from ws_d2.modeling import count_ws_convs

PAIRS = {
    "mask_rcnn": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x",
    "cascade_mask_rcnn": "COCO-InstanceSegmentation/cascade_mask_rcnn_R_50_FPN_gn_ws_3x",
}
# WS on the stem, the 16 x 3 block convs and 4 shortcuts of ResNet-50, the 8 FPN convs, 4 conv per box head, 4 mask
WS_CONVS = {"mask_rcnn": 53 + 8 + 4 + 4, "cascade_mask_rcnn": 53 + 8 + 3 * 4 + 4}


def load_pair(repo_root, pair):
    """(the YAML's config, the Python config) of a pair."""
    name = repo_root / "configs" / PAIRS[pair]
    return ws_d2.load_config(f"{name}.yaml", ["MODEL.DEVICE", "cpu"], freeze=False), LazyConfig.load(
        f"{name}.py"
    )


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pair", PAIRS)
def test_python_config_builds_the_yaml_model(repo_root, pair):
    cfg, lazy = load_pair(repo_root, pair)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        yaml_model, lazy_model = build_model(cfg), instantiate(lazy.model)
    assert shapes(lazy_model) == shapes(yaml_model)
    assert count_ws_convs(lazy_model) == count_ws_convs(yaml_model) == WS_CONVS[pair]
    # WS on every conv a norm follows and on no other, in the same places
    normed = {n for n, m in yaml_model.named_modules() if isinstance(m, Conv2d) and m.norm is not None}
    assert {n for n, m in lazy_model.named_modules() if isinstance(m, WSConv2d)} == normed
    frozen = {n for n, p in yaml_model.named_parameters() if not p.requires_grad}
    assert frozen and {n for n, p in lazy_model.named_parameters() if not p.requires_grad} == frozen


def same_weights(yaml_model, lazy_model):
    """The YAML model's random weights in both, with class 0's score raised so that there are detections."""
    state = yaml_model.state_dict()
    for key in state:
        if key.endswith("cls_score.bias"):
            state[key][0] = 8.0
    yaml_model.load_state_dict(state)
    lazy_model.load_state_dict(state)


@pytest.mark.parametrize("pair", PAIRS)
def test_python_config_gives_the_yaml_models_outputs_and_losses(repo_root, pair):
    """Small inputs (one 32 x 43 image) keep both R-50 models fast on the CPU; float32 on the same kernels in
    the same order: the outputs are bitwise equal."""
    cfg, lazy = load_pair(repo_root, pair)
    torch.manual_seed(0)
    yaml_model, lazy_model = build_model(cfg), instantiate(lazy.model)
    same_weights(yaml_model, lazy_model)
    data_cfg = cfg.clone()
    data_cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 8  # 2 gt boxes: a fast training step
    with torch.no_grad():
        image = synthetic_batch(data_cfg, size=32, batch=1, training=False)
        expected = yaml_model.eval()(image)[0]["instances"]
        outputs = lazy_model.eval()(image)[0]["instances"]
    assert len(expected) > 0 and outputs.image_size == expected.image_size
    for field in ("pred_boxes", "scores", "pred_classes", "pred_masks"):
        a, b = outputs.get(field), expected.get(field)
        a, b = (a.tensor, b.tensor) if field == "pred_boxes" else (a, b)
        assert torch.equal(a, b), (field, (a - b).abs().max())
    losses = []
    for model in (yaml_model, lazy_model):
        torch.manual_seed(0)  # the same proposal and RoI samples
        with EventStorage(0):
            losses.append(model.train()(synthetic_batch(data_cfg, size=32, batch=1, training=True)))
    assert losses[0].keys() == losses[1].keys() and "loss_mask" in losses[0]
    assert all(torch.equal(losses[1][k], losses[0][k]) for k in losses[0]), losses


def effect(augmentation):
    """What an augmentation does: the resize it gives two image shapes, or its flip settings."""
    if isinstance(augmentation, T.ResizeShortestEdge):
        return [
            vars(augmentation.get_transform(np.zeros(shape, np.uint8))) for shape in ((480, 640), (900, 3000))
        ]
    return type(augmentation), vars(augmentation)


@pytest.mark.parametrize("pair", PAIRS)
def test_python_config_trains_with_the_yaml_recipe(repo_root, pair):
    """Optimizer groups, the LR at every milestone, augmentation, batch, schedule length and weights."""
    cfg, lazy = load_pair(repo_root, pair)
    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    lazy.optimizer.params.model = model
    lazy_optimizer = instantiate(lazy.optimizer)
    assert type(lazy_optimizer) is type(optimizer)
    # per parameter of the one model, the recipe SGD follows: lr, momentum, weight decay (GN's too), ...; not
    # its kernel choice (detectron2 main's build_optimizer asks for foreach=True)
    recipe = [k for k in optimizer.defaults if k not in ("foreach", "fused", "differentiable", "capturable")]
    hyperparameters = [
        {id(p): {k: g[k] for k in recipe} for g in o.param_groups for p in g["params"]}
        for o in (optimizer, lazy_optimizer)
    ]
    assert hyperparameters[1] == hyperparameters[0]
    scheduler = build_lr_scheduler(cfg, optimizer)
    multiplier = instantiate(lazy.lr_multiplier)
    max_iter = lazy.train.max_iter
    assert max_iter == cfg.SOLVER.MAX_ITER
    for it in sorted(
        {0, 1, 250, 499, 500, 501, *cfg.SOLVER.STEPS, *(s - 1 for s in cfg.SOLVER.STEPS), max_iter - 1}
    ):
        # LRMultiplier's lr at iteration `it` is base_lr x multiplier(it / max_iter)
        expected = scheduler._multiplier(it / max_iter)
        assert multiplier(it / max_iter) == pytest.approx(expected, rel=1e-12), it
    assert lazy.optimizer.lr == cfg.SOLVER.BASE_LR
    for is_train, loader in ((True, lazy.dataloader.train), (False, lazy.dataloader.test)):
        mapper, lazy_mapper = DatasetMapper(cfg, is_train=is_train), instantiate(loader.mapper)
        assert [effect(a) for a in lazy_mapper.augmentations.augs] == [
            effect(a) for a in mapper.augmentations.augs
        ]
        assert lazy_mapper.image_format == mapper.image_format == "RGB"
        # test-time mappers drop annotations: only the train mapper's mask setting matters
        assert lazy_mapper.use_instance_mask == mapper.use_instance_mask or not is_train
    assert lazy.dataloader.train.total_batch_size == cfg.SOLVER.IMS_PER_BATCH
    assert (lazy.dataloader.train.dataset.names, lazy.dataloader.test.dataset.names) == (
        *cfg.DATASETS.TRAIN,
        *cfg.DATASETS.TEST,
    )
    assert lazy.train.init_checkpoint == cfg.MODEL.WEIGHTS
    assert lazy.train.checkpointer.period == cfg.SOLVER.CHECKPOINT_PERIOD
    assert lazy.train.eval_period == cfg.TEST.EVAL_PERIOD
