# GN+WS Cascade Mask R-CNN R-50-FPN 3x as a Python (LazyConfig) config: the twin of
# cascade_mask_rcnn_R_50_FPN_gn_ws_3x.yaml. The GN+WS Mask R-CNN's config, its RoI heads made a cascade as
# detectron2's common/models/cascade_rcnn.py does, with the GN+WS 4conv1fc box head at each of the three stages.
import ws_d2  # noqa: F401  (first: what an older detectron2 needs, e.g. its model_zoo on new setuptools)

# isort: split
from detectron2.config import LazyCall as L
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNOutputLayers

from .mask_rcnn_R_50_FPN_gn_ws_2x import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

_box_head = model.roi_heads.pop("box_head")
_box_predictor = model.roi_heads.pop("box_predictor")
model.roi_heads.pop("proposal_matcher")  # one per stage below
model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[_box_head] * 3,
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=_box_predictor.input_shape,
            test_score_thresh=_box_predictor.test_score_thresh,
            box2box_transform=L(Box2BoxTransform)(weights=(w1, w1, w2, w2)),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for (w1, w2) in [(10, 5), (20, 10), (30, 15)]
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[th], labels=[0, 1], allow_low_quality_matches=False) for th in [0.5, 0.6, 0.7]
    ],
)
model.proposal_generator.post_nms_topk = (2000, 1000)  # Cascade R-CNN keeps 2000 proposals in training

# 3x: 36 epochs x 7,330 iters; drops after epochs 27 and 33 (configs/Schedules.md)
train.max_iter = 263880
lr_multiplier.scheduler.milestones = [197910, 241890, 263880]
lr_multiplier.warmup_length = 500 / 263880
