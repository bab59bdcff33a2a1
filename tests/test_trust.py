"""Trust and faults without a localization run: the one config system, the central CLI error
handler (one line, the cause, the file or URL), validated priors and query lists, earlier results
never lost, and the classification of failures into input-caused and retryable."""
from __future__ import annotations

import importlib
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, replace

import numpy as np
import torch

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.errors import classify, describe
from cluster.filesystem import StorageAccessDenied, StorageError
from cluster.store import FeatureStore
from jobs import cli
from jobs.config import merge_conf, parse_overrides
from jobs.results import PARTS_DIR, SCHEMA, ExistingResults, ResultsWriter, check_output, read_results
from pixloc_core.geometry import Camera, Pose
from pixloc_core.io import read_priors, read_query_list
from pixloc_core.align import AlignResult
from pixloc_core.localize import (Checks, Localization, LocalizeConf, VerifyConf, best_of, checked, measure,
                                   search_on, verdict, verify)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Inner:
    levels: tuple[int, ...] = (0, 1, 2)
    threshold: float = 0.5


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    name: str = "a"


def test_conf_overrides_are_deep_merged_into_dicts_and_dataclasses():
    defaults = {"workers": 2, "shard": Outer(), "sift": {"max_size": 1600, "peak": 0.01}, "sparse": None}
    overrides = parse_overrides(["shard.inner.threshold=0.25", "shard.inner.levels=[1,2]", "sift.peak=0.02",
                                 "sparse={min_inliers: 30}"])
    conf = merge_conf(defaults, {"workers": 1}, overrides)
    assert conf["workers"] == 1 and conf["shard"] == Outer(Inner((1, 2), 0.25))
    assert conf["sift"] == {"max_size": 1600, "peak": 0.02} and conf["sparse"] == {"min_inliers": 30}
    assert defaults["sift"]["peak"] == 0.01  # the defaults are never modified
    with pytest.raises(ValueError, match="unknown conf key shard.inner.treshold"):
        merge_conf(defaults, parse_overrides(["shard.inner.treshold=1"]))
    with pytest.raises(ValueError, match="unknown conf key wrokers"):
        merge_conf(defaults, {"wrokers": 1})
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["workers"])


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_takes_conf_and_debug(command, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser(command).parse_args([command, "--help"])
    usage = capsys.readouterr().out
    assert "--conf KEY=VALUE" in usage and "--debug" in usage
    module = importlib.import_module(cli.COMMANDS[command][0])
    assert command == "bench" or isinstance(module.default_conf, dict)  # bench: each benchmark's own


def test_unknown_conf_keys_are_refused_before_any_work(tmp_path, capsys):
    arguments = ["localize", "--map", str(tmp_path), "--store", str(tmp_path), "--queries", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--priors", str(tmp_path / "priors.csv")]
    assert cli.main([*arguments, "--conf", "search.max_celss=3"]) == 2
    assert "unknown conf key search.max_celss" in capsys.readouterr().err
    # A known key passes the check; the job then fails on its missing input, in one line.
    assert cli.main([*arguments, "--conf", "search.max_cells=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pixloc localize: ") and "priors.csv" in err and err.count("\n") == 1


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    arguments = ["eval", "--results", str(tmp_path / "missing"), "--gt", str(tmp_path / "gt.txt")]
    assert cli.main(arguments) == 1
    err = capsys.readouterr().err
    assert err.startswith("pixloc eval: ") and "gt.txt" in err and err.count("\n") == 1
    with pytest.raises(FileNotFoundError):
        cli.main([*arguments, "--debug"])


def write_csv(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize("line, message", [
    ("a.jpg,200,10,0,5", "lat 200.0 outside \\[-90, 90\\]"),
    ("a.jpg,45,-190,0,5", "lon -190.0 outside \\[-180, 180\\]"),
    ("a.jpg,nan,10,0,5", "lat is not finite: 'nan'"),
    ("a.jpg,45,inf,0,5", "lon is not finite: 'inf'"),
    ("a.jpg,45,,0,5", "lon is empty"),
    ("a.jpg,45,x,0,5", "lon is not a number: 'x'"),
    ("a.jpg,45,10,0,0", "sigma_m must be positive, got 0.0"),
    ("a.jpg,45,10,0,-3", "sigma_m must be positive, got -3.0"),
    (",45,10,0,5", "empty name"),
])
def test_priors_are_validated_with_file_and_line(tmp_path, line, message):
    path = write_csv(tmp_path / "priors.csv", f"name,lat,lon,alt,sigma_m\nok.jpg,45,10,,5\n{line}\n")
    with pytest.raises(ValueError, match=f"^{path}:3: {message}$"):
        read_priors(path)


def test_empty_altitude_is_allowed_and_duplicates_are_refused_with_both_lines(tmp_path):
    path = write_csv(tmp_path / "priors.csv", "name,x,y,z\na.jpg,1,2,\nb.jpg,1,2,3\n")
    priors = read_priors(path)
    assert not priors["a.jpg"].has_altitude and priors["b.jpg"].position == (1.0, 2.0, 3.0)
    path = write_csv(tmp_path / "twice.csv", "name,x,y,z\na.jpg,1,2,3\nb.jpg,1,2,3\na.jpg,5,5,5\n")
    with pytest.raises(ValueError, match=f"{path}:4: 'a.jpg' is listed twice \\(first on line 2\\)"):
        read_priors(path)
    query_list = write_csv(tmp_path / "queries.txt", "a.jpg PINHOLE 320 240 200 200 160 120\n# comment\n"
                                                     "a.jpg PINHOLE 640 480 400 400 320 240\n")
    with pytest.raises(ValueError, match=f"{query_list}:3: 'a.jpg' is listed twice \\(first on line 1\\)"):
        read_query_list(query_list)


def test_earlier_results_need_resume_or_overwrite_and_survive_until_replaced(tmp_path):
    out = tmp_path / "out"
    writer = ResultsWriter(out)
    writer.add({"name": "old.jpg", "success": False, "error": "earlier"})
    writer.close()
    with pytest.raises(ExistingResults, match="pass --resume to continue them or --overwrite"):
        check_output(out)
    with pytest.raises(ValueError, match="exclude each other"):
        check_output(out, resume=True, overwrite=True)
    check_output(out, resume=True)
    check_output(out, overwrite=True)
    replacing = ResultsWriter(out, flush_every=1, overwrite=True)
    replacing.add({"name": "new.jpg", "success": False, "error": "new"})
    # Until the new job ends, the earlier results are kept aside, not deleted.
    assert pq.read_table(out / ".replaced" / "out-results.parquet").column("name").to_pylist() == ["old.jpg"]
    assert read_results(out).column("name").to_pylist() == ["new.jpg"]
    replacing.close()
    assert read_results(out).column("name").to_pylist() == ["new.jpg"] and not (out / ".replaced").exists()


def test_results_of_a_run_before_a_check_was_added_still_read(tmp_path):
    """`--resume` reads parts flushed by an older version: a check column it did not write
    (e.g. pnp_leave_one_out_std_m) reads as null, the rest as written."""
    older = pa.schema([field for field in SCHEMA if field.name != "pnp_leave_one_out_std_m"])
    (tmp_path / PARTS_DIR).mkdir()
    pq.write_table(pa.Table.from_pylist([{"name": "a.jpg", "success": True, "pnp_position_std_m": 0.2}], schema=older),
                   tmp_path / PARTS_DIR / "part-00000.parquet")
    (row,) = read_results(tmp_path).to_pylist()
    assert row["name"] == "a.jpg" and row["pnp_position_std_m"] == 0.2 and row["pnp_leave_one_out_std_m"] is None


def test_bad_input_leaves_earlier_results_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.parquet").write_bytes(b"earlier results")
    (out / "poses.txt").write_text("earlier poses\n")
    priors = write_csv(tmp_path / "priors.csv", "name,lat,lon\na.jpg,45,ten\n")
    arguments = ["localize", "--map", str(tmp_path / "map"), "--store", str(tmp_path / "store"),
                 "--queries", str(tmp_path), "--out", str(out), "--priors", str(priors)]
    assert cli.main(arguments) == 1
    assert "holds results of an earlier run" in capsys.readouterr().err
    assert cli.main([*arguments, "--overwrite"]) == 1
    assert capsys.readouterr().err == f"pixloc localize: {priors}:2: lon is not a number: 'ten'\n"
    assert (out / "results.parquet").read_bytes() == b"earlier results"
    assert (out / "poses.txt").read_text() == "earlier poses\n"


def test_missing_s3_credentials_name_the_url(s3_server, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    url = "s3://pixloc-test/stores/secret"
    with pytest.raises(StorageAccessDenied) as error:
        FeatureStore.open(url)
    message = describe(error.value)
    assert message.startswith(f"{url}/store.json: read refused, check the credentials") and "\n" not in message
    assert classify(error.value).retryable  # fix the credentials, then --resume


def test_unreachable_endpoint_is_retryable_and_one_line(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    from cluster.filesystem import RetryPolicy
    with pytest.raises(StorageError) as error:
        FeatureStore.open("s3://pixloc-test/stores/down", retry=RetryPolicy(attempts=2, backoff_s=0.01))
    failure = classify(error.value)
    assert failure.retryable and "s3://pixloc-test/stores/down/store.json" in failure.message
    assert "EndpointConnectionError" in failure.message and "\n" not in failure.message


def test_input_failures_are_not_retryable():
    assert not classify(ValueError("a.jpg: cannot decode")).retryable
    assert not classify(FileNotFoundError(2, "No such file or directory", "a.jpg")).retryable
    assert classify(OSError(28, "No space left on device", "/out/parts/part-1.parquet")).retryable
    assert describe(OSError(28, "No space left on device", "/out/x")) == "disk full: /out/x: No space left on device"
    ray_like = RuntimeError("\x1b[36mray::ShardActor.localize()\x1b[39m (pid=123, ip=127.0.0.1) boom")
    assert describe(ray_like) == "ray::ShardActor.localize() boom"


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root to mount a small tmpfs in a mount namespace")
def test_a_full_disk_is_one_line_with_the_path(tmp_path):
    """A real full filesystem: a 64 KiB tmpfs filled up, in a private mount namespace."""
    (tmp_path / "full").mkdir()
    (tmp_path / "gt.txt").write_text("a.jpg 1 0 0 0 0 0 0\n")
    target = tmp_path / "full" / "eval.json"
    script = (f"mount -t tmpfs -o size=64k tmpfs {tmp_path / 'full'} && "
              f"(dd if=/dev/zero of={tmp_path / 'full' / 'filler'} bs=4k 2>/dev/null; true) && "
              f"{sys.executable} -m jobs.cli eval --results {tmp_path / 'gt.txt'} --gt {tmp_path / 'gt.txt'} "
              f"--json {target}")
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 1
    assert result.stderr.endswith(f"pixloc eval: disk full: {target}: No space left on device\n")


# ----- verified success


def test_every_check_can_refuse_a_pose():
    conf = VerifyConf()
    pnp = dict(inliers=120, matches=300, pnp_position_std_m=0.05, pnp_split_shift_m=0.1, pnp_leave_one_out_std_m=0.06,
               prior_distance_m=8.0, prior_sigma_m=10.0, refinement_shift_m=0.02, refinement_turn_deg=0.1)
    assert verdict(Checks(**pnp), conf) == ""
    assert verdict(Checks(**{**pnp, "inliers": 10}), conf) == "too few PnP inliers: 10 < 20"
    assert verdict(Checks(**{**pnp, "matches": 1200}), conf).startswith(
        "too few matches agree with the pose: 120/1200 inliers (0.10 < 0.15)")
    assert verdict(Checks(**{**pnp, "pnp_position_std_m": 3.0}), conf).startswith("PnP pose too uncertain")
    assert verdict(Checks(**{**pnp, "pnp_split_shift_m": 4.2}), conf) == (
        "the image's halves disagree on the PnP pose: their poses lie 4.20 m apart > 3.0 m")
    assert verdict(Checks(**{**pnp, "pnp_split_shift_m": math.inf}), conf).startswith("the image's halves disagree")
    assert verdict(Checks(**{**pnp, "pnp_leave_one_out_std_m": 4.33}), conf) == (
        "the PnP pose hinges on one match: without it its std is 4.33 m > 1.5 m")
    assert verdict(Checks(**{**pnp, "pnp_leave_one_out_std_m": math.inf}), conf).startswith("the PnP pose hinges")
    assert verdict(Checks(**{**pnp, "rival_inliers": 80}), conf).startswith("ambiguous PnP: another pose has 80")
    assert verdict(Checks(**{**pnp, "inliers": 120, "matches": 1000}), conf).startswith("too few matches agree")
    assert verdict(Checks(**{**pnp, "refinement_shift_m": 4.0}), conf).startswith("refinement disagrees with PnP")
    far = Checks(**{**pnp, "prior_distance_m": 67.9})
    assert verdict(far, conf) == "inconsistent with the prior: 67.9 m from it, sigma 10.0 m"
    assert verdict(far, VerifyConf(trust_prior="low")) == ""
    # A dense pose has no PnP values: only the prior applies here (its own checks ran in `checked`).
    assert verdict(Checks(prior_distance_m=20.0, prior_sigma_m=10.0), conf) == ""


def test_measure_and_verify_keep_the_pose_and_give_the_reason():
    truth = Pose.from_Rt(torch.eye(3, dtype=torch.float64), torch.tensor([-30.0, -40.0, -1.0], dtype=torch.float64))
    refined = Localization(success=True, qvec=tuple(truth.qvec().tolist()), tvec=tuple(truth.t.tolist()),
                           hypothesis="sparse", cost=0.05, num_points=500)
    pnp = Pose.from_Rt(torch.eye(3, dtype=torch.float64), torch.tensor([-30.0, -40.5, -1.0], dtype=torch.float64))
    checks = measure(refined, np.zeros(3), 10.0, pnp,
                     Checks(inliers=100, matches=200, pnp_position_std_m=0.1, pnp_split_shift_m=0.1,
                            pnp_leave_one_out_std_m=0.11))
    assert checks.prior_distance_m == pytest.approx(50.0)  # horizontal: the centre is at (30, 40, 1)
    assert checks.refinement_shift_m == pytest.approx(0.5) and checks.refinement_turn_deg == pytest.approx(0.0)
    assert checks.to_dict()["inlier_ratio"] == 0.5
    verified = verify(refined, checks, VerifyConf())
    assert not verified.success and verified.qvec == refined.qvec
    assert verified.error == "inconsistent with the prior: 50.0 m from it, sigma 10.0 m"
    dense = replace(refined, hypothesis="ref:r.jpg")
    assert measure(dense, np.zeros(3), 10.0, pnp, Checks(inliers=100, matches=200)).matches == 0  # not a PnP pose


def test_a_verified_start_is_refused_for_its_cost_only_above_the_refined_cap():
    """At a cost between the two caps, a pose aligned from a reference hypothesis fails and one
    refined from a verified PnP pose does not; above both, both fail."""
    conf = LocalizeConf()
    assert conf.max_cost < 0.08 < conf.max_refined_cost

    def aligned(cost: float) -> AlignResult:
        pose = Pose.from_Rt(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
        return AlignResult(poses=pose[None], cost=torch.tensor([cost]), num_points=torch.tensor([500]),
                           success=torch.tensor([True]), hessian=1e6 * torch.eye(6, dtype=torch.float64)[None],
                           residual_variance=torch.tensor([cost]), failure_reason=[""])

    assert checked(aligned(0.08), 0, "sparse", True, conf).success
    hypothesis = checked(aligned(0.08), 0, "ref:r.jpg", False, conf)
    assert not hypothesis.success and hypothesis.error == f"cost too high: 0.0800 > {conf.max_cost}"
    refined = checked(aligned(0.095), 0, "sparse", True, conf)
    assert not refined.success and refined.error == f"cost too high: 0.0950 > {conf.max_refined_cost}"


def test_bench_precision_jobs_refuse_nothing():
    """bench precision recomputes success under looser thresholds than the defaults too: its jobs
    must keep every pose, whatever its checks' values."""
    from bench.precision import PERMISSIVE

    worst = Checks(inliers=1, matches=1000, pnp_position_std_m=math.inf, rival_inliers=999,
                   pnp_split_shift_m=math.inf, pnp_leave_one_out_std_m=math.inf, prior_distance_m=1e6,
                   prior_sigma_m=1.0, refinement_shift_m=1e3, refinement_turn_deg=180.0)
    assert verdict(worst, replace(VerifyConf(), **PERMISSIVE)) == ""
    # every bound is relaxed (the prior's two are moot with trust_prior low)
    assert set(PERMISSIVE) | {"prior_sigmas", "prior_margin_m"} == set(VerifyConf.__dataclass_fields__)


def test_bench_precision_quick_smoke(ray_cluster, tmp_path):
    """`pixloc bench precision --conf quick=true` (CI form, smaller still): report, table, plot."""
    out = tmp_path / "precision.json"
    assert cli.main(["bench", "precision", "--out", str(out), "--conf", "quick=true", "refs=[30]", "queries=4",
                     f"work_dir={tmp_path / 'work'}"]) == 0
    import json

    report = json.loads(out.read_text())
    (entry,) = report["scenes"]["synth 30 refs, 10 m"].values()
    assert entry["queries"] == 4 and 0 <= entry["recall"] <= 1
    for threshold, values in report["conf"]["sweeps"].items():
        assert [point[threshold] for point in entry["curves"][threshold]] == values
    assert out.with_suffix(".png").is_file()


def test_a_second_consensus_elsewhere_is_a_rival():
    """Matches left out by the first PnP pose that all agree on a pose 3 m away are a rival;
    left-out matches of the same pose (support the first missed) are not."""
    import pycolmap

    from pixloc_core.sparse import default_conf, ransac_max_error, rival_inliers

    rng = np.random.default_rng(0)
    camera = pycolmap.Camera(model="SIMPLE_PINHOLE", width=320, height=240, params=[250.0, 160.0, 120.0])
    first = pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.zeros(3))
    elsewhere = pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.array([3.0, 0.0, 0.0]))
    xyz = np.column_stack([rng.uniform(-4, 4, 40), rng.uniform(-3, 3, 40), rng.uniform(6, 12, 40)])

    def seen_from(pose: pycolmap.Rigid3d) -> np.ndarray:
        return np.array([camera.img_from_cam(pose * point) for point in xyz])

    options = pycolmap.AbsolutePoseEstimationOptions()
    options.ransac.max_error = ransac_max_error(camera, default_conf)
    assert rival_inliers(seen_from(elsewhere), xyz, camera, options, first, default_conf) >= 35
    assert rival_inliers(seen_from(first), xyz, camera, options, first, default_conf) == 0
    assert rival_inliers(seen_from(first)[:3], xyz[:3], camera, options, first, default_conf) == 0


def test_the_halves_of_a_view_explained_by_two_poses_disagree():
    """Inliers of one pose everywhere: the poses of the left and right halves agree. Left half
    seen from the pose, right half from 3 m beside it (a pose held up by look-alike structure on
    one side): the halves' poses lie metres apart."""
    import pycolmap

    from pixloc_core.sparse import split_shift

    rng = np.random.default_rng(0)
    camera = pycolmap.Camera(model="SIMPLE_PINHOLE", width=320, height=240, params=[250.0, 160.0, 120.0])
    pose = pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.zeros(3))
    beside = pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.array([3.0, 0.0, 0.0]))
    xyz = np.column_stack([rng.uniform(-4, 4, 60), rng.uniform(-3, 3, 60), rng.uniform(6, 12, 60)])
    xy = camera.img_from_cam(pose * xyz) + rng.normal(0, 0.5, (60, 2))
    assert split_shift(xy, xyz, camera, pose) < 0.3
    right = xy[:, 0] >= np.median(xy[:, 0])
    xy[right] = camera.img_from_cam(beside * xyz[right])
    assert split_shift(xy, xyz, camera, pose) > 2.0


def test_a_pose_that_hinges_on_one_match_is_told_apart():
    """Thirty points on a facade 55 m away, all at one depth in a narrow strip of the view, fix
    the direction to it but hardly the distance; a 31st point 167 m away fixes that alone (q_0009
    of bench precision, where that match was wrong). Without it the centre's std grows tenfold,
    while points spread in depth and across the view each matter little. The closed form
    (Woodbury) equals leaving each match out and inverting again."""
    import pycolmap

    from pixloc_core.sparse import leave_one_out_centre_std

    def centre_stds(xyz, camera, pose):  # with every match, and with each left out in turn, from scratch
        world_to_camera = Pose.from_colmap(pose).double()
        points = world_to_camera * torch.from_numpy(xyz)
        J = Camera.from_colmap(camera).double().J_project(points) @ world_to_camera.J_transform(points)
        information = J.transpose(-1, -2) @ J  # (N, 6, 6)

        def std(matrix):
            return float(torch.linalg.inv(matrix)[:3, :3].trace().sqrt())
        return std(information.sum(0)), [std(information.sum(0) - one) for one in information]

    rng = np.random.default_rng(0)
    camera = pycolmap.Camera(model="SIMPLE_RADIAL", width=640, height=480, params=[500.0, 320.0, 240.0, 0.02])
    pose = pycolmap.Rigid3d(pycolmap.Rotation3d(np.eye(3)), np.zeros(3))
    facade = np.column_stack([rng.uniform(0.0, 3.0, 30), rng.uniform(-4, 4, 30), rng.uniform(54.5, 55.5, 30)])
    decided = np.vstack([facade, [[10.0, -2.0, 167.0]]])
    with_all, left_out = centre_stds(decided, camera, pose)
    assert leave_one_out_centre_std(decided, camera, pose) == pytest.approx(max(left_out), rel=1e-6)
    assert max(left_out) > 10 * with_all
    spread = np.column_stack([rng.uniform(-8, 8, 31), rng.uniform(-4, 4, 31), rng.uniform(6, 40, 31)])
    with_all, left_out = centre_stds(spread, camera, pose)
    assert leave_one_out_centre_std(spread, camera, pose) == pytest.approx(max(left_out), rel=1e-6)
    assert max(left_out) < 1.2 * with_all


def test_a_query_searches_its_next_cell_only_while_none_gave_a_verified_pose():
    found = Localization(success=True, qvec=(1.0, 0.0, 0.0, 0.0), tvec=(0.0, 0.0, 0.0), cost=0.05)
    refused = Localization(success=False, cost=0.05, error="PnP pose too uncertain: std 2.1 m > 1.5 m")
    outage = Localization.failure("shard actor died", retryable=True)
    assert search_on([]) and search_on([refused]) and search_on([refused, outage])
    assert not search_on([found]) and not search_on([outage, found])


def test_a_query_with_a_part_that_could_not_run_is_retried_with_that_cause():
    input_failure = Localization(success=False, cost=0.08, error="too few points: 37 < 100")
    outage = Localization.failure("store unreachable: s3://b/store/cell=x+0000_y+0000/level=0/_manifest.json", retryable=True)
    best = best_of([input_failure, outage])
    assert best is outage and best.retryable
    assert best_of([input_failure, Localization.failure("no pose hypothesis")]) is input_failure
    found = Localization(success=True, qvec=(1.0, 0.0, 0.0, 0.0), tvec=(0.0, 0.0, 0.0), cost=0.05)
    assert best_of([outage, found]) is found


def test_an_aligned_pose_is_checked_against_the_querys_own_keypoints():
    """With an extractor that detects keypoints, an aligned pose must explain the query's
    keypoints matched to the cell's features (keypoint_support), whatever its std: the right pose
    explains them, a pose 1 m off does not."""
    from pixloc_core.align import ReferenceLevel
    from pixloc_core.geometry import Camera
    from pixloc_core.localize import Checks, LocalizeConf, alignment_verdict, keypoint_support
    from pixloc_core.sparse import QueryKeypoints

    generator = torch.Generator().manual_seed(0)
    camera = Camera("PINHOLE", 640.0, 480.0, torch.tensor([500.0, 500.0, 320.0, 240.0]))
    points = torch.rand(400, 3, generator=generator) * torch.tensor([8.0, 6.0, 6.0]) + torch.tensor([-4.0, -3.0, 4.0])
    features = torch.nn.functional.normalize(torch.randn(400, 32, generator=generator), dim=-1)
    reference = ReferenceLevel(points, features, torch.ones(400))
    truth = Pose.from_Rt(torch.eye(3), torch.zeros(3))
    p2d, _ = camera.project(truth.transform(points[:150]))  # the query sees 150 of the points
    noisy = torch.nn.functional.normalize(features[:150] + 0.1 * torch.randn(150, 32, generator=generator), dim=-1)
    keypoints = QueryKeypoints((p2d + 0.5).double().numpy(), noisy.half().numpy())
    conf = LocalizeConf()

    right = keypoint_support(keypoints, reference, truth, camera, conf)
    assert right.keypoint_matches >= 120 and right.keypoint_support_ratio > 0.9
    assert alignment_verdict(0.05, position_std_m=5.0, verified=False, conf=conf, checks=right) == ""

    off = keypoint_support(keypoints, reference, Pose.from_Rt(torch.eye(3), torch.tensor([1.0, 0.0, 0.0])), camera, conf)
    assert off.keypoint_matches >= 100 and off.keypoint_support < conf.min_keypoint_support
    assert alignment_verdict(0.05, 0.001, False, conf, off).startswith("too few of the query's keypoints agree")
    # without keypoints, the std decides as before
    assert alignment_verdict(0.05, 0.001, False, conf, Checks()) == ""
    assert alignment_verdict(0.05, 5.0, False, conf, Checks()).startswith("position too uncertain")
