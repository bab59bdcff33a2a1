"""Seeded synthetic street scenes, an analytic ray-casting renderer and a dataset writer.

    scene = build_scene(SceneConfig(seed=0))
    camera = PinholeIntrinsics.centered(640, 480, focal=554.66)
    image = render(scene, camera, R_cam_from_world, t_cam_from_world)  # (H, W, 3) uint8
    dataset.main(out_dir, {"num_refs": 150, "num_queries": 40})        # `pixloc synth`
"""
from .cameras import WalkConfig, rotation_from_angles, sample_walk_poses
from .render import PinholeIntrinsics, RayHits, raycast, render
from .scene import Scene, SceneConfig, build_scene

__all__ = [
    "PinholeIntrinsics", "RayHits", "Scene", "SceneConfig", "WalkConfig",
    "build_scene", "raycast", "render", "rotation_from_angles", "sample_walk_poses",
]
