from types import SimpleNamespace

import pynvml  # nvidia-ml-py, a dependency: its real error types, whether or not this machine has a GPU
import pytest

from controller.controller import BudgetController, ControllerConfig
from controller.policy import default_ladder
from controller.signals import GpuSampler, LatencyWindow, PromQLReader, arrival_gap

from .loads import IDLE, levels, teach


class FakeNVML:
    """The functions of pynvml the sampler uses, for a machine with `count` GPUs at `used` memory, or (with
    `init_error`) one where nvmlInit fails as the real library does without a driver."""

    def __init__(self, used: float = 0.5, count: int = 1, init_error: int | None = None):
        self.used = used
        self.count = count
        self.init_error = init_error

    def nvmlInit(self):
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=int(self.used * 80e9), total=int(80e9))


NO_GPU = [  # (how NVML says there is no GPU, what the snapshot's reason names)
    (FakeNVML(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), "NVMLError_LibraryNotFound"),  # no driver installed
    (FakeNVML(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED), "NVMLError_DriverNotLoaded"),
    (FakeNVML(count=0), "NVML reports no GPU"),
]


@pytest.mark.parametrize("nvml,reason", NO_GPU, ids=["library-not-found", "driver-not-loaded", "no-device"])
def test_nvml_absent_reports_unavailable_and_controller_still_decides(nvml, reason):
    gpu = GpuSampler(nvml=nvml)
    assert not gpu.available and reason in gpu.snapshot().reason
    controller = BudgetController(default_ladder(24), gpu=gpu.start())
    teach(controller)
    assert gpu.sample_once() == gpu.snapshot() and not gpu.snapshot().available
    assert controller.memory_cap() == 0 and not controller.status().gpu_available
    assert controller.choose(levels([1.0] * 5), IDLE, 10.0, 0.0).level == 0


def test_the_real_nvml_reports_what_this_machine_has():
    """With or without a GPU: available with readings in range, or unavailable saying why; the controller decides
    either way (at the level GPU memory allows)."""
    gpu = GpuSampler()  # the real nvidia-ml-py
    snapshot = gpu.sample_once()
    if gpu.available:
        assert snapshot.available and 0 <= snapshot.utilization <= 1 and 0 <= snapshot.memory_used_fraction <= 1
    else:
        assert not snapshot.available and snapshot.reason
    controller = BudgetController(default_ladder(24), gpu=gpu)
    teach(controller)
    assert controller.status().gpu_available == gpu.available
    assert controller.choose(levels([1.0] * 5), IDLE, 10.0, 0.0).level == controller.memory_cap()


def test_memory_pressure_above_threshold_caps_quality():
    """The cap reads the engine's memory pressure (its KV pool and allocator headroom), not NVML's used memory:
    NVML reporting a full device changes nothing."""
    nvml = FakeNVML(used=0.99)
    gpu = GpuSampler(nvml=nvml)
    gpu.sample_once()
    pressure = [0.5]
    controller = BudgetController(default_ladder(24), ControllerConfig(memory_threshold=0.9), gpu=gpu,
                                  memory=lambda: pressure[0])
    teach(controller)
    assert controller.memory_cap() == 0 and controller.choose(levels([1.0] * 5), IDLE, 10.0, 0.0).level == 0
    pressure[0] = 0.95
    decision = controller.choose(levels([1.0] * 5), IDLE, 10.0, 0.0)
    assert controller.memory_cap() == 3 and decision.level == 3 and "memory" in decision.reason
    pressure[0] = None  # unknown: no cap
    assert controller.memory_cap() == 0


def test_latency_window_quantile_and_expiry():
    now = [0.0]
    window = LatencyWindow(window_s=10, clock=lambda: now[0])
    for i in range(100):
        window.add(i / 100)
    assert window.quantile(0.95) == (0.94, 100)
    now[0] = 11
    assert window.quantile(0.95) == (None, 0)


def test_the_arrival_gap_is_the_windows_mean_unless_the_rate_has_risen():
    assert arrival_gap([], 1.0) is None and arrival_gap([0.0], 1.0) is None
    assert arrival_gap([0.0, 1.0, 2.0, 3.0], 4.0) == pytest.approx(1.0)  # steady: span to now per arrival
    # a rate that falls (a burst, then silence) is read over the whole window: the silence lengthens the mean
    assert arrival_gap([0.0, 0.5, 1.0, 1.5], 6.0) == pytest.approx(1.5)
    # a trickle, then a burst: its four arrivals every 0.4 s are the rate, where the window's mean says 1.6 s
    assert arrival_gap([-8.0, -4.0, 0.0, 0.4, 0.8, 1.2], 1.6) == pytest.approx(0.4)
    # two arrivals after the trickle, 0.6 s apart, are too few to tell a rise from chance: the mean holds
    assert arrival_gap([-9.0, -3.0, 0.0, 0.6], 1.2) == pytest.approx(10.2 / 4)


def test_prometheus_unreachable_falls_back_to_the_window():
    reader = PromQLReader("http://127.0.0.1:9", "up", timeout_s=0.5)  # nothing listens on port 9
    assert reader.fetch().value is None and reader.latest().error
    controller = BudgetController(default_ladder(24), prometheus=reader)
    teach(controller)
    for _ in range(10):
        controller.window.add(0.5)
    assert controller.p95()[:2] == (0.5, "window")


def test_feedback_uses_latency_as_a_share_of_each_requests_slo():
    now = [0.0]
    controller = BudgetController(default_ladder(24), ControllerConfig(slo_s=1.0), clock=lambda: now[0])
    teach(controller)
    for _ in range(20):  # 2 s requests with a 10 s SLO are well within it, though over the 1 s default
        controller.observe(2.0, slo_s=10.0)
    now[0] = 10.0
    controller.tick()
    assert controller.status().p95_ratio == 0.2
    assert controller.feedback.margin == ControllerConfig().feedback.min_margin  # room: it stays at its floor


def test_only_controlled_requests_steer_the_margin():
    now = [0.0]
    controller = BudgetController(default_ladder(24), ControllerConfig(slo_s=1.0), clock=lambda: now[0])
    teach(controller)
    for _ in range(20):
        controller.observe(5.0, controlled=False)  # explicit plans far over the SLO: not the controller's doing
    now[0] = 10.0
    controller.tick()
    # nothing in the window: no evidence of overload, so the margin only relaxes (it never rises)
    assert controller.feedback.margin == ControllerConfig().feedback.min_margin
    assert controller.window.quantile(0.95) == (None, 0)
