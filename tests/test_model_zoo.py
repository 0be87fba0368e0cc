"""ws_d2.model_zoo: every config by name, the published trained weights of each GN+WS detector, refusals."""

from pathlib import Path

import pytest

from ws_d2 import model_zoo
from ws_d2.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if "Base-" not in p.name)


def test_every_config_by_name_and_the_published_weights_of_the_gn_ws_detectors(repo_root):
    # MMDetection published GN+WS Faster and Mask R-CNN only (not Cascade, RetinaNet or Panoptic FPN)
    trained = [
        n
        for n in ALL
        if n.startswith(("COCO-Detection/faster_rcnn_", "COCO-InstanceSegmentation/mask_rcnn_"))
    ]
    trained = [n for n in trained if "_gn_ws_" in n]
    assert trained and set(model_zoo.published.TRAINED) == set(trained)  # which 12: test_configs.py
    for name in ALL:
        assert model_zoo.get_config_file(name) == str(CONFIGS / name)
        cfg = model_zoo.get_config(name)
        assert not cfg.is_frozen() and cfg.MODEL.WS.ENABLED  # ws_d2's keys are there
    model_zoo_md = (repo_root / "MODEL_ZOO.md").read_text()
    for name in trained:
        url = model_zoo.get_checkpoint_url(name)
        assert model_zoo.get_config(name, trained=True).MODEL.WEIGHTS == url
        # MMDetection's layout: <its config name>/<its config name>_<date>-<hash>.pth, documented per model
        folder, file = url.split("/")[-2:]
        assert file.startswith(folder + "_") and f"`{url}`" in model_zoo_md
        # the detector's type, depth/width and schedule match the config's
        arch, schedule = name[: -len(".yaml")].split("rcnn_")[1].split("_FPN_gn_ws_")
        assert folder.startswith(name.split("/")[1][:4]) and arch.lower().replace("_", "") in folder.replace(
            "_", ""
        )
        assert schedule.replace("-", "_") in folder


def test_configs_without_published_weights_and_unknown_names_are_refused():
    for name in ALL:
        if (
            name not in model_zoo.published.TRAINED
        ):  # BCN+WS, the quickstart, Cascade, RetinaNet, Panoptic FPN
            with pytest.raises(ConfigError, match=f"^{name} has no published trained weights"):
                model_zoo.get_checkpoint_url(name)
    with pytest.raises(ConfigError, match="is not one of ws_d2's configs"):
        model_zoo.get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml", trained=True)


def test_python_configs_by_name_with_their_yaml_twins_weights():
    python = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.py"))
    assert "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_gn_ws_2x.py" in python
    for name in python:
        assert model_zoo.get_config_file(name) == str(CONFIGS / name)
        cfg, twin = model_zoo.get_config(name), name[: -len(".py")] + ".yaml"
        if (
            twin in ALL
        ):  # the same weights as the YAML twin: ImageNet by URL unless converted into pretrained/
            assert cfg.train.init_checkpoint == model_zoo.get_config(twin).MODEL.WEIGHTS
        if twin in model_zoo.published.TRAINED:
            url = model_zoo.get_checkpoint_url(twin)
            assert model_zoo.get_checkpoint_url(name) == url
            assert model_zoo.get_config(name, trained=True).train.init_checkpoint == url
