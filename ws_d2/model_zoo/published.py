"""Where the published weights of ws_d2's configs live (MMDetection's `configs/gn+ws` metafile and mmcv's
`open-mmlab://` table); WSCheckpointer downloads each once and converts it in memory."""

_MMDET = "https://download.openmmlab.com/mmdetection/v2.0/gn%2Bws"
# MMDetection's re-hosted copies of the authors' ImageNet GN+WS models (`open-mmlab://jhu/...`)
_JHU = "https://s3.ap-northeast-2.amazonaws.com/open-mmlab/pretrain/third_party"

# config (under configs/) -> MMDetection's trained detector ("<its config name>/<file>")
# fmt: off
TRAINED = {
    f"COCO-{task}/{config}.yaml": f"{_MMDET}/{file.rsplit('_', 1)[0]}/{file}.pth"
    for task, config, file in [
        ("Detection", "faster_rcnn_R_50_FPN_gn_ws_1x", "faster_rcnn_r50_fpn_gn_ws-all_1x_coco_20200130-613d9fe2"),
        ("Detection", "faster_rcnn_R_101_FPN_gn_ws_1x", "faster_rcnn_r101_fpn_gn_ws-all_1x_coco_20200205-a93b0d75"),
        ("Detection", "faster_rcnn_X_50_32x4d_FPN_gn_ws_1x", "faster_rcnn_x50_32x4d_fpn_gn_ws-all_1x_coco_20200203-839c5d9d"),
        ("Detection", "faster_rcnn_X_101_32x4d_FPN_gn_ws_1x", "faster_rcnn_x101_32x4d_fpn_gn_ws-all_1x_coco_20200212-27da1bc2"),
        ("InstanceSegmentation", "mask_rcnn_R_50_FPN_gn_ws_2x", "mask_rcnn_r50_fpn_gn_ws-all_2x_coco_20200226-16acb762"),
        ("InstanceSegmentation", "mask_rcnn_R_101_FPN_gn_ws_2x", "mask_rcnn_r101_fpn_gn_ws-all_2x_coco_20200212-ea357cd9"),
        ("InstanceSegmentation", "mask_rcnn_X_50_32x4d_FPN_gn_ws_2x", "mask_rcnn_x50_32x4d_fpn_gn_ws-all_2x_coco_20200216-649fdb6f"),
        ("InstanceSegmentation", "mask_rcnn_X_101_32x4d_FPN_gn_ws_2x", "mask_rcnn_x101_32x4d_fpn_gn_ws-all_2x_coco_20200319-33fb95b5"),
        ("InstanceSegmentation", "mask_rcnn_R_50_FPN_gn_ws_20-23-24e", "mask_rcnn_r50_fpn_gn_ws-all_20_23_24e_coco_20200213-487d1283"),
        ("InstanceSegmentation", "mask_rcnn_R_101_FPN_gn_ws_20-23-24e", "mask_rcnn_r101_fpn_gn_ws-all_20_23_24e_coco_20200213-57b5a50f"),
        ("InstanceSegmentation", "mask_rcnn_X_50_32x4d_FPN_gn_ws_20-23-24e", "mask_rcnn_x50_32x4d_fpn_gn_ws-all_20_23_24e_coco_20200226-969bcb2c"),
        ("InstanceSegmentation", "mask_rcnn_X_101_32x4d_FPN_gn_ws_20-23-24e", "mask_rcnn_x101_32x4d_fpn_gn_ws-all_20_23_24e_coco_20200316-e6cd35ef"),
    ]
}

# ImageNet GN+WS backbone (the seed configs' MODEL.WEIGHTS) -> MMDetection's re-hosted copy of the authors' file
IMAGENET = {
    "pretrained/R-50-GN-WS.pkl": f"{_JHU}/resnet50_gn_ws-15beedd8.pth",
    "pretrained/R-101-GN-WS.pkl": f"{_JHU}/resnet101_gn_ws-3e3c308c.pth",
    "pretrained/X-50-32x4d-GN-WS.pkl": f"{_JHU}/resnext50_32x4d_gn_ws-0d87ac85.pth",
    "pretrained/X-101-32x4d-GN-WS.pkl": f"{_JHU}/resnext101_32x4d_gn_ws-34ac1a9e.pth",
}
# fmt: on
