"""SceneMap's camera lookup for query photos by EXIF: the map's calibrated camera, also for
resized copies of mapping-device photos."""
from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from pixloc_core import exif
from pixloc_core.datasets import copy_image
from pixloc_core.map_io import SceneMap, exif_camera_key

FOCAL_35MM = 35.0


def _scene_with_phone_camera() -> SceneMap:
    """A map whose one camera is a self-calibrated 1024 x 768 phone camera (EXIF 35 mm focal 35)."""
    reconstruction = pycolmap.Reconstruction()
    reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
        camera_id=3, model="SIMPLE_RADIAL", width=1024, height=768, params=[890.0, 510.0, 380.0, -0.03]))
    key = exif_camera_key(1024, 768, exif.focal_px_from_35mm(FOCAL_35MM, 1024, 768))
    return SceneMap(reconstruction, exif_cameras={key: 3})


def test_same_size_gets_the_map_camera():
    scene = _scene_with_phone_camera()
    camera = scene.camera_for_exif(1024, 768, exif.focal_px_from_35mm(FOCAL_35MM, 1024, 768))
    assert camera is not None and camera.camera_id == 3
    np.testing.assert_allclose(camera.params, [890.0, 510.0, 380.0, -0.03])


def test_resized_copy_gets_the_map_camera_rescaled():
    scene = _scene_with_phone_camera()
    camera = scene.camera_for_exif(480, 360, exif.focal_px_from_35mm(FOCAL_35MM, 480, 360))
    assert camera is not None and (camera.width, camera.height) == (480, 360)
    scale = 480 / 1024
    np.testing.assert_allclose(camera.params, [890.0 * scale, 510.0 * scale, 380.0 * scale, -0.03])
    # The map's own camera is left as it was.
    np.testing.assert_allclose(scene.reconstruction.cameras[3].params, [890.0, 510.0, 380.0, -0.03])


@pytest.mark.parametrize("width, height, focal_35mm", [
    (480, 320, FOCAL_35MM),  # another aspect ratio: a crop, not a resize
    (480, 360, 28.0),  # another lens
    (1024, 768, 36.0),
])
def test_other_devices_get_no_map_camera(width, height, focal_35mm):
    scene = _scene_with_phone_camera()
    assert scene.camera_for_exif(width, height, exif.focal_px_from_35mm(focal_35mm, width, height)) is None


def test_resized_lund_photo_reads_back_as_the_map_device(shared_data, tmp_path):
    """A downscaled copy keeps its EXIF block: its EXIF focal, read at its new size, finds the
    camera of the original size."""
    source = shared_data / "opensfm" / "lund" / "images" / "04.jpg"
    scene = SceneMap(pycolmap.Reconstruction(), exif_cameras={
        exif_camera_key(1024, 768, exif.read_exif_focal_px(source, 1024, 768)): 1})
    scene.reconstruction.add_camera_with_trivial_rig(pycolmap.Camera(
        camera_id=1, model="SIMPLE_RADIAL", width=1024, height=768, params=[890.0, 512.0, 384.0, 0.0]))
    scale_x, scale_y = copy_image(source, tmp_path / "04.jpg", 480)
    width, height = round(1024 * scale_x), round(768 * scale_y)
    camera = scene.camera_for_exif(width, height, exif.read_exif_focal_px(tmp_path / "04.jpg", width, height))
    assert camera is not None
    assert camera.params[0] == pytest.approx(890.0 * width / 1024)
