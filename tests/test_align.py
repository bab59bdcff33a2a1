"""Featuremetric alignment on a rendered synthetic street: convergence, failure modes, batching."""
from __future__ import annotations

import math

import pytest
import torch

from bench.align import AlignmentProblem, align_trials, synthetic_problem
from pixloc_core.align import (AlignConf, FeaturemetricAligner, ReferenceLevel, _QueryLevel, barron_cauchy,
                               damping_to_raw, raw_to_damping)
from pixloc_core.extractors.base import FeatureLevel, sample_feature_map
from pixloc_core.geometry import Camera, Pose, perturb_poses


@pytest.fixture(scope="module")
def problem() -> AlignmentProblem:
    return synthetic_problem({"num_points": 500})


@pytest.fixture(scope="module")
def aligner() -> FeaturemetricAligner:
    return FeaturemetricAligner().eval()


def assert_no_nan(result) -> None:
    assert result.poses.is_finite().all()
    for tensor in (result.cost, result.hessian):
        assert not torch.isnan(tensor).any()


def test_converges_from_30cm_3deg(problem, aligner):
    T_init = perturb_poses(problem.T_true, 0.3, 3.0, torch.Generator().manual_seed(0), num=50)
    result, error_R, error_t = align_trials(aligner, problem, T_init)

    converged = (error_t < 0.02) & (error_R < 0.2)
    assert converged.float().mean() >= 0.9, f"median error {error_t.median():.3f} m {error_R.median():.3f} deg"
    assert result.success[converged].all()
    assert (result.num_points[result.success] >= AlignConf.min_points).all()
    assert len(result.iterations) == 3 and all(n >= 1 for n in result.iterations)
    assert_no_nan(result)

    hessian = result.hessian[result.success]  # (S, 6, 6)
    assert torch.allclose(hessian, hessian.transpose(-1, -2), rtol=1e-5, atol=1e-8)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert (eigenvalues > -1e-6 * eigenvalues.abs().amax(-1, keepdim=True)).all()
    assert (eigenvalues[:, -1] > 0).all()


def test_pose_std_does_not_depend_on_the_scale_of_the_confidences(problem, aligner):
    """Confidences k times larger weigh every point k times more: the Hessian grows k-fold, the
    uncertainty of the pose must not shrink. With the mean cost as the variance, ALIKE's score
    confidences (about 0.06 once the reference's and the query's are multiplied) read 16x the std
    of the same fit with confidences near 1, and no bound fitted one extractor."""
    from pixloc_core.localize import alignment_covariance, pose_std

    T_init = perturb_poses(problem.T_true, 0.1, 1.0, torch.Generator().manual_seed(3), num=1)
    stds = []
    for scale in (1.0, 0.05):
        references = [ReferenceLevel(level.points3D, level.features, level.confidence * scale)
                      for level in problem.references]
        with torch.no_grad():
            result = aligner(problem.query, references, problem.camera, T_init)
        assert result.success.all()
        stds.append(pose_std(alignment_covariance(result.hessian[0], float(result.residual_variance[0])))[0])
    assert stds[1] == pytest.approx(stds[0], rel=1e-3) and 0 < stds[0] < 0.05


def test_steps_stop_below_a_fraction_of_a_feature_pixel(problem, aligner):
    # From 5 cm and 0.5 deg every level converges well before its iteration limit.
    T_init = perturb_poses(problem.T_true, 0.05, 0.5, torch.Generator().manual_seed(7), num=4)
    result, error_R, error_t = align_trials(aligner, problem, T_init)
    assert result.success.all() and (error_t < 0.02).all() and (error_R < 0.2).all()
    assert all(run < limit for run, limit in zip(result.iterations, aligner.conf.num_iterations)), result.iterations


def test_only_the_lowest_costs_go_past_the_coarsest_level(problem):
    aligner = FeaturemetricAligner(AlignConf(num_kept=1))
    T_init = Pose.stack([perturb_poses(problem.T_true, 3.0, 10.0, torch.Generator().manual_seed(0), num=1)[0],
                         perturb_poses(problem.T_true, 0.1, 1.0, torch.Generator().manual_seed(0), num=1)[0]])
    result, _, error_t = align_trials(aligner, problem, T_init)
    assert result.success.tolist() == [False, True] and error_t[1] < 0.02
    assert result.failure_reason[0] == "not among the 1 lowest costs at stride 16"
    assert torch.equal(result.poses.t[0], T_init.t[0]) and torch.isinf(result.cost[0])


def test_coarsest_level_ends_once_the_kept_hypotheses_have_stopped(problem):
    """The far hypotheses, still moving and costlier, do not hold the coarse level open: it ends
    with the near one's convergence, and the near one wins as it does when all run to the end."""
    near = perturb_poses(problem.T_true, 0.1, 1.0, torch.Generator().manual_seed(1), num=1)
    far = perturb_poses(problem.T_true, 3.0, 20.0, torch.Generator().manual_seed(2), num=3)
    T_init = Pose.stack([*far, near[0]])
    pruned, _, error_t = align_trials(FeaturemetricAligner(AlignConf(num_kept=1)), problem, T_init)
    everything, _, _ = align_trials(FeaturemetricAligner(), problem, T_init)
    assert pruned.success.tolist() == [False, False, False, True] and error_t[3] < 0.02
    # A far start may converge to the same pose: a tie (to float rounding, which differs between CPUs).
    assert torch.isclose(everything.cost[3], everything.cost.min(), rtol=1e-4), everything.cost
    assert pruned.iterations[0] < everything.iterations[0], (pruned.iterations, everything.iterations)


def test_batched_equals_one_by_one(problem):
    # Few iterations, so that hypotheses are still moving: any cross-talk would show.
    aligner = FeaturemetricAligner(AlignConf(num_iterations=(4, 3, 2)))
    T_init = perturb_poses(problem.T_true, 0.3, 3.0, torch.Generator().manual_seed(1), num=3)
    batched, _, _ = align_trials(aligner, problem, T_init)
    for index in range(3):
        single, _, _ = align_trials(aligner, problem, T_init[index:index + 1])
        assert bool(single.success[0]) == bool(batched.success[index])
        assert torch.allclose(single.poses.R[0], batched.poses.R[index], atol=1e-5)
        assert torch.allclose(single.poses.t[0], batched.poses.t[index], atol=1e-4)
        assert torch.allclose(single.cost[0], batched.cost[index], rtol=1e-4)
        scale = batched.hessian[index].abs().max()
        assert torch.allclose(single.hessian[0], batched.hessian[index], rtol=1e-3, atol=1e-6 * scale)


def test_nan_initial_pose_fails_alone(problem, aligner):
    T_init = perturb_poses(problem.T_true, 0.1, 1.0, torch.Generator().manual_seed(2), num=3)
    data = T_init._data.clone()
    data[1, 0] = math.nan
    data[2, -1] = math.inf
    result, _, _ = align_trials(aligner, problem, Pose(data))

    assert result.success.tolist() == [True, False, False]
    assert result.failure_reason[0] == ""
    assert "not finite" in result.failure_reason[1] and "not finite" in result.failure_reason[2]
    assert_no_nan(result)
    assert torch.isinf(result.cost[1:]).all() and (result.num_points[1:] == 0).all()


def test_zero_focal_camera_fails(problem, aligner):
    camera = Camera("PINHOLE", *problem.camera.size.tolist(), problem.camera.params * torch.tensor([0, 0, 1, 1]))
    T_init = perturb_poses(problem.T_true, 0.1, 1.0, torch.Generator().manual_seed(3), num=2)
    result = aligner(problem.query, problem.references, camera, T_init)

    assert not result.success.any()
    assert all("camera is not valid" in reason for reason in result.failure_reason)
    assert torch.equal(result.poses.R, T_init.R) and torch.equal(result.poses.t, T_init.t)
    assert_no_nan(result)


def test_empty_or_unseen_points_fail(problem, aligner):
    T_init = perturb_poses(problem.T_true, 0.1, 1.0, torch.Generator().manual_seed(4), num=2)
    channels = problem.references[0].features.shape[1]
    empty = ReferenceLevel(torch.zeros(0, 3), torch.zeros(0, channels), torch.zeros(0))
    result = aligner(problem.query, [empty, *problem.references[1:]], problem.camera, T_init)
    assert not result.success.any()
    assert all(reason == "no reference points at stride 16" for reason in result.failure_reason)
    assert_no_nan(result)

    # Points all behind the camera: nothing projects, too few valid points at the first level.
    behind = [ReferenceLevel(problem.T_true.inv().transform(-problem.T_true.transform(reference.points3D)),
                             reference.features, reference.confidence) for reference in problem.references]
    result = aligner(problem.query, behind, problem.camera, T_init)
    assert not result.success.any()
    assert all("fewer than 10 valid points at stride 16" == reason for reason in result.failure_reason)
    assert_no_nan(result)


def test_bad_input_shapes_raise_value_error(problem, aligner):
    T_init = perturb_poses(problem.T_true, 0.1, 1.0, torch.Generator().manual_seed(5), num=2)
    with pytest.raises(ValueError, match="levels"):
        aligner(problem.query[:2], problem.references[:2], problem.camera, T_init)
    with pytest.raises(ValueError, match="batch shape"):
        aligner(problem.query, problem.references, problem.camera, problem.T_true)
    wrong_channels = [ReferenceLevel(r.points3D, r.features[:, :2], r.confidence) for r in problem.references]
    with pytest.raises(ValueError, match="channels"):
        aligner(problem.query, wrong_channels, problem.camera, T_init)


def test_dampings_are_learnable_and_loaded_finest_first(problem):
    aligner = FeaturemetricAligner(AlignConf(num_iterations=(2, 2, 2)))
    T_init = perturb_poses(problem.T_true, 0.1, 1.0, torch.Generator().manual_seed(6), num=2)
    result = aligner(problem.query, problem.references, problem.camera, T_init)
    error_R, error_t = result.poses.error_to(problem.T_true)
    (error_R.sum() + error_t.sum()).backward()
    assert aligner.damping_raw.grad is not None and torch.isfinite(aligner.damping_raw.grad).all()
    assert aligner.damping_raw.grad.abs().sum() > 0

    lambdas = torch.tensor([1e-4, 1e-2, 1.0]).repeat_interleave(6).view(3, 6)  # finest first
    aligner.load_dampings(damping_to_raw(lambdas))
    assert torch.allclose(aligner.dampings, lambdas.flip(0), rtol=1e-4)
    assert torch.allclose(raw_to_damping(damping_to_raw(lambdas)), lambdas, rtol=1e-4)


def test_query_level_lookup_interpolates_features_and_central_differences():
    generator = torch.Generator().manual_seed(9)
    features, confidence = torch.rand(5, 7, 9, generator=generator), torch.rand(7, 9, generator=generator)
    camera = Camera("PINHOLE", 18.0, 14.0, torch.tensor([10.0, 10.0, 9.0, 7.0]))  # the level is half its size
    level = _QueryLevel.prepare(FeatureLevel(features, confidence, 2), camera)
    assert level.camera.size.tolist() == [9.0, 7.0]
    # inside the map by more than a pixel, where central differences need no padding
    p2d = torch.rand(2, 20, 2, generator=generator) * torch.tensor([6.0, 4.0]) + 1.5  # (M, N, 2)
    sampled, gradient, sampled_confidence = level.sample(p2d)
    d_dy, d_dx = torch.gradient(features, dim=(1, 2))
    assert torch.allclose(sampled, sample_feature_map(features, p2d), atol=1e-5)
    assert torch.allclose(gradient[..., 0, :], sample_feature_map(d_dx, p2d), atol=1e-5)
    assert torch.allclose(gradient[..., 1, :], sample_feature_map(d_dy, p2d), atol=1e-5)
    assert torch.allclose(sampled_confidence, sample_feature_map(confidence[None], p2d)[..., 0], atol=1e-5)


def test_building_blocks():
    # Pixel centres sample exactly (COLMAP convention), and the robust loss is Cauchy-like.
    feature_map = torch.arange(12.0).view(1, 3, 4)
    sampled = sample_feature_map(feature_map, torch.tensor([[0.5, 0.5], [3.5, 2.5], [1.0, 0.5]]))  # (3, 1)
    assert torch.allclose(sampled[:, 0], torch.tensor([0.0, 11.0, 0.5]), atol=1e-5)
    cost, weight = barron_cauchy(torch.tensor([0.0, 0.02, 100.0]), scale=0.1)
    assert cost[0] == 0 and weight[0] == 1 and 0.49 < weight[1] < 0.51 and weight[2] < 1e-3
