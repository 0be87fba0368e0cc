"""Predictions in the COCO results format, scorable by pycocotools' COCOeval against an annotation file."""

import json
import os

from detectron2.evaluation.coco_evaluation import instances_to_coco_json

__all__ = [
    "assign_image_ids",
    "category_ids_for",
    "image_ids_from_coco_annotations",
    "instances_to_coco_results",
]


def instances_to_coco_results(instances, image_id, category_ids=None):
    """One COCO result dict per instance: image_id, category_id, bbox (XYWH, pixels), score, and
    segmentation (RLE with str counts) when the model predicts masks.

    `category_ids` ({data set category id: contiguous class index}, see `category_ids_for`) maps the
    model's class indices back to the data set's ids, as COCOEvaluator does; None keeps the indices.
    """
    results = instances_to_coco_json(instances.to("cpu"), image_id)
    if category_ids:
        dataset_id_of = {contiguous: dataset_id for dataset_id, contiguous in category_ids.items()}
        for result in results:
            result["category_id"] = dataset_id_of[result["category_id"]]
    return results


def category_ids_for(metadata, annotation_file=None):
    """{data set category id: contiguous class index}: the metadata's own mapping when it has one (set
    when detectron2 loads a COCO-format set), else the annotation file's categories in detectron2's
    order (sorted ids, as load_coco_json numbers them), else None."""
    mapping = getattr(metadata, "thing_dataset_id_to_contiguous_id", None) if metadata is not None else None
    if mapping:
        return dict(mapping)
    if annotation_file:
        with open(annotation_file) as f:
            ids = sorted(category["id"] for category in json.load(f)["categories"])
        return {dataset_id: index for index, dataset_id in enumerate(ids)}
    return None


def image_ids_from_coco_annotations(annotation_file):
    """{file base name: image id} from a COCO annotation file's `images` list."""
    with open(annotation_file) as f:
        images = json.load(f)["images"]
    return {os.path.basename(image["file_name"]): image["id"] for image in images}


def assign_image_ids(paths, annotation_file=None):
    """{path: COCO image id} for the demo's inputs.

    With an annotation file the ids are its own (matched by file base name; an input it does not list
    is an error). Without one, file names that are all integers (COCO's 000000139.jpg) give those
    integers, and otherwise the inputs are numbered 1..N in order.
    """
    if annotation_file:
        ids = image_ids_from_coco_annotations(annotation_file)
        unknown = [p for p in paths if os.path.basename(p) not in ids]
        if unknown:
            raise ValueError(
                f"{annotation_file} lists no image named {os.path.basename(unknown[0])} ({unknown[0]})"
            )
        return {p: ids[os.path.basename(p)] for p in paths}
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return {p: int(s) for p, s in zip(paths, stems)}
    return {p: i for i, p in enumerate(paths, start=1)}
