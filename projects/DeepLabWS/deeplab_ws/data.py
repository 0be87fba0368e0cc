"""The shapes set as semantic segmentation: one PNG label map per image, rasterized from the generator's own
polygons, registered as detectron2 sem_seg sets `ws_d2_synthetic_sem_seg_train` / `_val`.

Every pixel has a class: 0 is the background (a class of its own, scored in the mIoU), 1-3 the shapes in
SYNTHETIC_CLASSES' order; 255 (ignore) is never written, only declared, as detectron2's sem_seg sets do.
"""

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg

from ws_d2.data import SYNTHETIC_CLASSES, default_synthetic_root, generate_synthetic_dataset, write_label_maps

__all__ = ["IGNORE_LABEL", "SEM_SEG_CLASSES", "generate_synthetic_sem_seg", "register_synthetic_sem_seg"]

SEM_SEG_CLASSES = ["background", *SYNTHETIC_CLASSES]
IGNORE_LABEL = 255
SPLITS = ("train", "val")
MISSING_HINT = "generate it with deeplab_ws.generate_synthetic_sem_seg() (train_net.py does)"


def _label_dir(root, split):
    return os.path.join(root, f"sem_seg_{split}")


def generate_synthetic_sem_seg(root=None, splits=None, **generator_arguments):
    """The shapes set (`ws_d2.data.generate_synthetic_dataset`, same arguments) plus its label maps under
    `root/sem_seg_<split>/`; a split whose label maps match its annotation file is kept as is."""
    root = root or default_synthetic_root()
    written = generate_synthetic_dataset(root, splits, **generator_arguments)
    labels = {name: SEM_SEG_CLASSES.index(name) for name in SYNTHETIC_CLASSES}
    for split, (json_file, _) in written.items():
        write_label_maps(json_file, _label_dir(root, split), labels, background=0)
    return {split: (os.path.join(root, split), _label_dir(root, split)) for split in written}


def register_synthetic_sem_seg(root=None, prefix="ws_d2_synthetic_sem_seg", splits=SPLITS):
    """Register `{prefix}_{split}` with detectron2's `load_sem_seg`, whether or not the files exist yet."""
    root = root or default_synthetic_root()
    names = []
    for split in splits:
        name, image_dir, label_dir = f"{prefix}_{split}", os.path.join(root, split), _label_dir(root, split)
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda i=image_dir, g=label_dir: load_sem_seg(g, i, "png", "png"))
        MetadataCatalog.get(name).set(
            stuff_classes=list(SEM_SEG_CLASSES),
            ignore_label=IGNORE_LABEL,
            image_root=image_dir,
            sem_seg_root=label_dir,
            evaluator_type="sem_seg",
            missing_hint=MISSING_HINT,
        )
        names.append(name)
    return names
