"""`pixloc bench devices` (CPU-sized smoke run; a GPU, where torch sees one, is timed too) and the
bench command's --conf overrides."""
import json
import subprocess
import sys

import pytest

from bench import devices


def test_devices_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "devices.json"
    report = devices.main(out, image_size=(128, 96), hypotheses=(1, 4), warmup=0, repeats=1)

    cpu = report["devices"]["cpu"]
    assert set(cpu["extractors"]) >= {"classic", "intensity", "unet-vgg16 (random weights)"}
    assert all(row["ms_per_image"] > 0 for row in cpu["extractors"].values())
    assert cpu["extractors"]["classic"]["image_size"] == [128, 96]
    # 0.3 m / 3 deg is well inside the basin (`pixloc bench align`): every device must converge.
    for entry in report["devices"].values():
        assert [row["success_rate"] for row in entry["alignment"].values()] == [1.0, 1.0]
    assert json.loads(out.read_text())["devices"].keys() == report["devices"].keys()
    assert "align 4 hypotheses" in capsys.readouterr().out


# What the GPU machines lack (device KINDS.md): only torch, numpy and the like are there.
ABSENT_ON_GPU_MACHINES = ["ray", "pycolmap", "pyproj", "s3fs", "piexif"]


def pixloc_without(absent: list[str], *argv: str) -> subprocess.CompletedProcess:
    """`pixloc ARGV` in a Python where importing any of `absent` fails."""
    program = (f"import sys; sys.modules.update(dict.fromkeys({absent!r})); "
               "from jobs.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", program, *argv], capture_output=True, text=True, timeout=300)


def test_devices_benchmark_needs_neither_ray_nor_pycolmap(tmp_path):
    """It runs where the GPUs are, and a failure there is still one line, not a traceback of the
    error handler's own imports."""
    tiny = ["--conf", "image_size=[64,48]", "hypotheses=[1]", "speed_only_extractors=[]", "warmup=0", "repeats=1"]
    done = pixloc_without(ABSENT_ON_GPU_MACHINES, "bench", "devices", "--out", str(tmp_path / "devices.json"), *tiny)
    assert done.returncode == 0, done.stderr
    assert "align 1 hypotheses (success 100%" in done.stdout

    (tmp_path / "a_file").write_text("")
    failed = pixloc_without(ABSENT_ON_GPU_MACHINES, "bench", "devices", "--out", str(tmp_path / "a_file" / "d.json"), *tiny)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("pixloc bench: ") and "a_file" in failed.stderr


def test_speedups_are_cpu_time_over_device_time():
    entry = {"extractors": {"classic": {"ms_per_image": 10.0}}, "alignment": {"1": {"ms_per_call": 4.0}}}
    faster = {"extractors": {"classic": {"ms_per_image": 2.5}}, "alignment": {"1": {"ms_per_call": 8.0}}}
    ratios = devices.speedups({"cpu": entry, "cuda:0": faster})
    assert ratios == {"cuda:0": {"extractors": {"classic": pytest.approx(4.0)}, "alignment": {"1": pytest.approx(0.5)}}}


def test_bench_conf_overrides_are_yaml_and_checked(tmp_path, capsys):
    from jobs.config import parse_overrides
    from jobs.cli import main as pixloc

    assert parse_overrides(["sets=[lund]", "workers=1", "quick=true"]) == {"sets": ["lund"], "workers": 1, "quick": True}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["workers"])
    assert pixloc(["bench", "devices", "--conf", "no_such_key=1"]) == 2
    assert "unknown conf keys ['no_such_key']" in capsys.readouterr().err

    out = tmp_path / "devices.json"
    assert pixloc(["bench", "devices", "--out", str(out), "--conf", "image_size=[64,48]", "hypotheses=[2]",
                   "speed_only_extractors=[]", "warmup=0", "repeats=1"]) == 0
    report = json.loads(out.read_text())
    assert list(report["devices"]["cpu"]["alignment"]) == ["2"]
    assert report["devices"]["cpu"]["extractors"]["intensity"]["image_size"] == [64, 48]
