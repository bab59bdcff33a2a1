"""`pixloc bench devices`: the same extraction and alignment work on the CPU and on each GPU.

Per device, in one run so that the ratios are fair:

* every extractor that loads without a download, plus the PixLoc-sized `unet-vgg16` with random
  weights (its speed does not depend on them), on one image at the extractor's working size:
  milliseconds per image;
* the coarse-to-fine alignment of `pixloc bench align`'s problem with M hypotheses in one batch,
  started 0.3 m / 3 deg from the truth: milliseconds per call, hypotheses per second, and the
  success rate, which must not depend on the device.

Times are medians over `repeats` runs after `warmup` runs (CUDA is synchronised around each).
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import write_report
from bench.align import AlignmentProblem, align_trials, synthetic_problem
from pixloc_core.align import FeaturemetricAligner
from pixloc_core.extractors import available_extractors, build_unet, load_extractor
from pixloc_core.extractors.base import Extractor
from pixloc_core.geometry import perturb_poses

logger = logging.getLogger(__name__)

default_conf = {
    "seed": 0,
    "image_size": (1024, 768),  # (w, h) before each extractor's own max_size applies
    "cap_to_max_size": True,  # False: every extractor at image_size (e.g. ALIKE above its 640 px)
    "speed_only_extractors": ("unet-vgg16",),  # random weights: their time, not their features
    "hypotheses": (1, 16, 64, 256),
    "init_t_m": 0.3,
    "init_R_deg": 3.0,
    "success_t_m": 0.02,
    "success_R_deg": 0.2,
    "warmup": 2,
    "repeats": 5,
}


def available_devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    devices += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    return devices


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


def median_seconds(run: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of run(); kernels are awaited, so GPU work is counted where it happens."""
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def extractors_to_time(conf: dict) -> dict[str, Extractor]:
    extractors = {name: load_extractor(name) for name in available_extractors()}
    extractors |= {f"{name} (random weights)": build_unet(name).eval() for name in conf["speed_only_extractors"]}
    return extractors


def time_extractors(extractors: dict[str, Extractor], device: torch.device, conf: dict) -> dict[str, dict]:
    generator = torch.Generator().manual_seed(conf["seed"])
    width, height = conf["image_size"]
    rows = {}
    for name, extractor in extractors.items():
        scale = min(1.0, extractor.max_size / max(width, height)) if conf["cap_to_max_size"] else 1.0
        size = (round(height * scale), round(width * scale))
        image = torch.rand(1, 3, *size, generator=generator).to(device)  # (1, 3, h, w)
        extractor = extractor.to(device)
        with torch.no_grad():
            seconds = median_seconds(lambda: extractor.extract(image), device, conf["warmup"], conf["repeats"])
        rows[name] = {"ms_per_image": 1000 * seconds, "image_size": [size[1], size[0]]}
    return rows


def problem_on(problem: AlignmentProblem, device: torch.device) -> AlignmentProblem:
    return AlignmentProblem([level.to(device) for level in problem.query],
                            [reference.to(device) for reference in problem.references],
                            problem.camera.to(device), problem.T_true.to(device))


def time_alignment(problem: AlignmentProblem, device: torch.device, conf: dict) -> dict[str, dict]:
    problem = problem_on(problem, device)
    aligner = FeaturemetricAligner().to(device)
    rows = {}
    for num in conf["hypotheses"]:
        generator = torch.Generator().manual_seed(conf["seed"] + num)
        T_init = perturb_poses(problem.T_true.to("cpu"), conf["init_t_m"], conf["init_R_deg"], generator, num=num)
        T_init = T_init.to(device)
        seconds = median_seconds(lambda: align_trials(aligner, problem, T_init), device,
                                 conf["warmup"], conf["repeats"])
        _, error_R, error_t = align_trials(aligner, problem, T_init)
        success = (error_t < conf["success_t_m"]) & (error_R < conf["success_R_deg"])
        rows[str(num)] = {"ms_per_call": 1000 * seconds, "hypotheses_per_s": num / seconds,
                          "success_rate": success.float().mean().item()}
    return rows


def main(out: Path | None = None, **conf) -> dict:
    conf = {**default_conf, **conf}
    devices = available_devices()
    if len(devices) == 1:
        logger.warning("no GPU visible to torch: the report has the CPU only")
    problem = synthetic_problem({"seed": conf["seed"]})
    extractors = extractors_to_time(conf)
    report = {"devices": {}, "torch": torch.__version__}
    for device in devices:
        logger.info("timing on %s", device_name(device))
        report["devices"][str(device)] = {
            "name": device_name(device),
            "extractors": time_extractors(extractors, device, conf),
            "alignment": time_alignment(problem, device, conf),
        }
    report["cpu_over_device"] = speedups(report["devices"])
    print_table(report)
    write_report(report, out)
    return report


def speedups(devices: dict[str, dict]) -> dict[str, dict]:
    """CPU time / device time for every row of every accelerator."""
    cpu = devices["cpu"]
    ratios = {}
    for device, entry in devices.items():
        if device == "cpu":
            continue
        ratios[device] = {
            "extractors": {name: cpu["extractors"][name]["ms_per_image"] / row["ms_per_image"]
                           for name, row in entry["extractors"].items()},
            "alignment": {num: cpu["alignment"][num]["ms_per_call"] / row["ms_per_call"]
                          for num, row in entry["alignment"].items()},
        }
    return ratios


def print_table(report: dict) -> None:
    devices = report["devices"]
    accelerators = report["cpu_over_device"]
    print("devices: " + "; ".join(f"{device} = {entry['name']}" for device, entry in devices.items()))
    header = f"{'work (ms)':<46}" + "".join(f"{device:>12}" for device in devices) + \
             "".join(f"{'cpu/' + device:>14}" for device in accelerators)
    print(header)
    print("-" * len(header))
    cpu = devices["cpu"]
    for name, row in cpu["extractors"].items():
        label = f"extract {name} {row['image_size'][0]}x{row['image_size'][1]}"
        print(f"{label:<46}" + "".join(f"{entry['extractors'][name]['ms_per_image']:>12.1f}" for entry in devices.values())
              + "".join(f"{ratios['extractors'][name]:>13.1f}x" for ratios in accelerators.values()))
    for num in cpu["alignment"]:
        label = f"align {num} hypotheses (success " + "/".join(
            f"{entry['alignment'][num]['success_rate']:.0%}" for entry in devices.values()) + ")"
        print(f"{label:<46}" + "".join(f"{entry['alignment'][num]['ms_per_call']:>12.1f}" for entry in devices.values())
              + "".join(f"{ratios['alignment'][num]:>13.1f}x" for ratios in accelerators.values()))
