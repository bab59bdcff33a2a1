"""Dataset adapters on the real data: conventions checked against the pixels, not only the files."""
from __future__ import annotations

import numpy as np
import pycolmap
import pytest
import torch
from PIL import Image

from jobs.map import build_map, exif_priors
from pixloc_core.datasets import (LUND, copy_image, prepare_fountain, prepare_lund, prepare_sacre_coeur,
                                  read_strecha_camera, register_pseudo_ground_truth)
from pixloc_core.exif import read_exif_focal_px, read_exif_gps
from pixloc_core.geometry import Pose, skew
from pixloc_core.io import read_poses, read_priors, read_query_list
from pixloc_core.map_io import SceneMap
from pixloc_core.mapping.matching import match_descriptors, normalize_descriptors
from pixloc_core.images import read_image
from pixloc_core.mapping.sift import SiftExtractor


@pytest.fixture(scope="module")
def fountain(shared_data, tmp_path_factory):
    return prepare_fountain(shared_data, tmp_path_factory.mktemp("fountain"),
                            {"max_image_size": 768, "query_max_image_size": 480})


def test_strecha_camera_rejects_truncated_file(tmp_path):
    path = tmp_path / "0000.jpg.camera"
    path.write_text("1 0 0\n0 1 0\n0 0 1\n")
    with pytest.raises(ValueError, match="0000.jpg.camera: expected 26 numbers"):
        read_strecha_camera(path)


def test_fountain_split_and_files(fountain, shared_data):
    assert fountain.query_names == ["0001.jpg", "0004.jpg", "0007.jpg", "0010.jpg"]
    assert len(fountain.mapping_names) == 7
    model = pycolmap.Reconstruction(fountain.reference_model)
    assert sorted(image.name for image in model.images.values()) == fountain.mapping_names
    assert set(read_poses(fountain.gt_poses)) == set(fountain.query_names)

    query_list = read_query_list(fountain.query_list)
    for name, intrinsics in query_list.items():
        assert Image.open(fountain.query_dir / name).size == (intrinsics.width, intrinsics.height) == (480, 320)
    for image in model.images.values():
        camera = model.cameras[image.camera_id]
        assert Image.open(fountain.mapping_dir / image.name).size == (camera.width, camera.height) == (768, 512)

    gt = {name: read_strecha_camera(shared_data / "strecha/fountain-P11/gt_dense_cameras" / f"{name}.camera")
          for name in fountain.query_names}
    offsets = [np.subtract(p.position, gt[name].center) for name, p in read_priors(fountain.priors).items()]
    np.testing.assert_allclose(np.linalg.norm(offsets, axis=1), 2.0, rtol=1e-4)  # 4-decimal CSV


def _sampson_errors(x0: np.ndarray, x1: np.ndarray, K0, K1, pose0: Pose, pose1: Pose) -> np.ndarray:
    """x0, x1: (N, 2) matched pixels (COLMAP convention). Sampson distance (px) to the epipolar
    geometry of the two world-to-camera poses."""
    relative = pose1 @ pose0.inv()
    E = skew(relative.t) @ relative.R
    F = (torch.linalg.inv(K1).T @ E @ torch.linalg.inv(K0)).numpy()
    h0 = np.concatenate([x0, np.ones((len(x0), 1))], 1)
    h1 = np.concatenate([x1, np.ones((len(x1), 1))], 1)
    Fx0, Ftx1 = h0 @ F.T, h1 @ F
    numerator = np.sum(h1 * Fx0, 1) ** 2
    return np.sqrt(numerator / (Fx0[:, 0] ** 2 + Fx0[:, 1] ** 2 + Ftx1[:, 0] ** 2 + Ftx1[:, 1] ** 2))


def test_fountain_gt_agrees_with_the_pixels(fountain):
    """SIFT matches between a mapping image (reference model) and a downscaled query (GT file,
    query list) lie on the epipolar lines of the two poses: the pose convention (R^T, -R^T C)
    and the intrinsics scaling of both image sizes are right to well under a pixel."""
    model = pycolmap.Reconstruction(fountain.reference_model)
    reference = model.find_image_with_name("0000.jpg")
    K0 = torch.from_numpy(model.cameras[reference.camera_id].calibration_matrix())
    pose0 = Pose.from_colmap(reference.cam_from_world())
    qvec, tvec = read_poses(fountain.gt_poses)["0001.jpg"]
    pose1 = Pose.from_qvec_tvec(torch.from_numpy(qvec), torch.from_numpy(tvec))
    intrinsics = read_query_list(fountain.query_list)["0001.jpg"]
    fx, fy, cx, cy = intrinsics.params
    K1 = torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=torch.float64)

    sift = SiftExtractor({"max_num_features": 2048})
    features0 = sift(read_image(fountain.mapping_dir / "0000.jpg", "L"))
    features1 = sift(read_image(fountain.query_dir / "0001.jpg", "L"))
    matches = match_descriptors(normalize_descriptors(features0.descriptors),
                                normalize_descriptors(features1.descriptors), ratio_threshold=0.75)
    assert len(matches) > 200
    errors = _sampson_errors(features0.xy[matches[:, 0]], features1.xy[matches[:, 1]], K0, K1, pose0, pose1)
    assert np.median(errors) < 0.5
    # The same matches against a query pitched by 1 degree (across the roughly horizontal
    # epipolar lines of this sideways motion): the check can tell.
    rotated = Pose.from_aa(torch.tensor([np.radians(1.0), 0.0, 0.0], dtype=torch.float64),
                           torch.zeros(3, dtype=torch.float64)) @ pose1
    assert np.median(_sampson_errors(features0.xy[matches[:, 0]], features1.xy[matches[:, 1]],
                                     K0, K1, pose0, rotated)) > 2.0


def test_lund_split_priors_and_exif(shared_data, tmp_path):
    lund = prepare_lund(shared_data, tmp_path, {"query_max_image_size": 480})
    assert lund.query_names == ["04.jpg", "08.jpg", "12.jpg", "16.jpg", "20.jpg", "24.jpg", "28.jpg"]
    assert len(lund.mapping_names) == 22 and not set(lund.mapping_names) & set(lund.query_names)
    source = shared_data / LUND / "images"
    assert (lund.mapping_dir / "01.jpg").read_bytes() == (source / "01.jpg").read_bytes()
    priors = read_priors(lund.priors)
    for name in lund.query_names:
        assert priors[name].geodetic
        np.testing.assert_allclose(priors[name].position, read_exif_gps(source / name), atol=1e-9)
        # the downscaled query keeps its EXIF: GPS, and a focal length that scales with the image
        assert Image.open(lund.query_dir / name).size == (480, 360)
        assert read_exif_gps(lund.query_dir / name) == read_exif_gps(source / name)
        np.testing.assert_allclose(read_exif_focal_px(lund.query_dir / name, 480, 360),
                                   read_exif_focal_px(source / name, 1024, 768) * 480 / 1024)


def test_sacre_coeur(shared_data, tmp_path):
    sacre_coeur = prepare_sacre_coeur(shared_data, tmp_path)
    assert len(sacre_coeur.mapping_names) == 10 and sacre_coeur.query_names == ["night.jpg"]
    assert Image.open(sacre_coeur.query_dir / "night.jpg").size == (1024, 768)
    assert read_exif_focal_px(sacre_coeur.query_dir / "night.jpg", 1024, 768) is not None


@pytest.mark.slow
def test_lund_queries_register_into_the_map_as_pseudo_ground_truth(shared_data, tmp_path):
    """Held-out photos of the street join the SfM map with its poses fixed: each lands between the
    photos taken just before and after it along the walk, and the map itself does not move."""
    source = shared_data / LUND / "images"
    names = [f"{i:02d}.jpg" for i in range(1, 13)]
    queries = ["04.jpg", "08.jpg"]
    for name in names:
        copy_image(source / name, tmp_path / "all" / name, None)
        if name not in queries:
            copy_image(source / name, tmp_path / "mapping" / name, None)
    mapping = [name for name in names if name not in queries]
    sift_conf = {"max_image_size": 800}  # the map's and the registration's, as they must be
    scene = build_map(tmp_path / "mapping", tmp_path / "map", priors=exif_priors(tmp_path / "mapping", mapping),
                      conf={"sift": sift_conf})
    before = scene.image_centers()

    poses = register_pseudo_ground_truth(tmp_path / "map", tmp_path / "all", queries, tmp_path / "work",
                                         {"sift": sift_conf})

    assert sorted(poses) == queries
    after = SceneMap.load(tmp_path / "map").image_centers()
    assert all(np.allclose(after[name], before[name]) for name in before)
    for query in queries:
        index = names.index(query)
        previous, following = before.get(names[index - 1]), before.get(names[index + 1])
        if previous is None or following is None:
            continue  # a neighbour the map did not register
        qvec, tvec = poses[query]
        center = Pose.from_qvec_tvec(torch.from_numpy(qvec), torch.from_numpy(tvec)).center().numpy()
        step = following - previous
        along = float((center - previous) @ step / (step @ step))
        across = np.linalg.norm(center - previous - along * step)
        assert 0.0 < along < 1.0 and across < 1.0, (query, along, across)
