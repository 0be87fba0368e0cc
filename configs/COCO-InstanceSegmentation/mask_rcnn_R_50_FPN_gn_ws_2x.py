# GN+WS Mask R-CNN R-50-FPN 2x as a Python (LazyConfig) config: the twin of mask_rcnn_R_50_FPN_gn_ws_2x.yaml,
# the same model (state_dict and outputs) and recipe. detectron2's own `common/` configs, changed as
# Base-GN-WS-RCNN-FPN.yaml changes detectron2's defaults. Train: tools/lazyconfig_train_net.py.
import ws_d2  # noqa: F401  (first: what an older detectron2 needs, e.g. its model_zoo on new setuptools)

# isort: split
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.model_zoo import get_config
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from ws_d2.modeling import WSFastRCNNConvFCHead, WSMaskRCNNConvUpsampleHead, convert_to_ws

model = get_config("common/models/mask_rcnn_fpn.py").model
dataloader = get_config("common/data/coco.py").dataloader
optimizer = get_config("common/optim.py").SGD
train = get_config("common/train.py").train

# GN in the ResNet and FPN, then WS on every conv a GN follows: build_ws_resnet_fpn_backbone's model
_fpn = model.backbone
_fpn.norm = "GN"
_fpn.bottom_up.stem.norm = "GN"
_fpn.bottom_up.stages.update(norm="GN", stride_in_1x1=False)  # the ImageNet models stride on the 3x3 conv
_fpn.bottom_up.freeze_at = 2  # stem and res2 frozen, as in the recipe
model.backbone = L(convert_to_ws)(module=_fpn, eps=1e-5)

# 4conv1fc box head and 4conv mask head, GN+WS (ws_d2's head classes: WS on their normalized convs)
model.roi_heads.box_head = L(WSFastRCNNConvFCHead)(
    input_shape=ShapeSpec(channels=256, height=7, width=7),
    conv_dims=[256] * 4,
    fc_dims=[1024],
    conv_norm="GN",
    ws_eps=1e-5,
)
model.roi_heads.mask_head.update(_target_=WSMaskRCNNConvUpsampleHead, conv_norm="GN", ws_eps=1e-5)

# the authors' ImageNet GN+WS models were trained on RGB in [0, 1] with ImageNet mean/std
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"
dataloader.train.mapper.augmentations[0].short_edge_length = (800,)

# 16 images per optimizer step (2 per GPU x 8 GPUs; on fewer GPUs use train.iter_size)
dataloader.train.total_batch_size = 16
optimizer.params.weight_decay_norm = 1e-4  # MMDetection decays GN parameters too

# 2x: 24 epochs x 7,330 iters; drops after epochs 16 and 22 (configs/Schedules.md). As in detectron2's
# schedules, the milestones are fractions of the last one: train.max_iter alone rescales the schedule.
train.max_iter = 175920
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[117280, 161260, 175920]),
    warmup_length=500 / 175920,
    warmup_method="linear",
    warmup_factor=0.001,
)

train.init_checkpoint = "pretrained/R-50-GN-WS.pkl"  # tools/convert_pretrained.py output, see MODEL_ZOO.md
train.iter_size = 1  # micro-batches per optimizer step: total_batch_size images in iter_size passes
train.eval_period = 0  # evaluate at the end only
