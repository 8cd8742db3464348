from types import SimpleNamespace

from controller.controller import BudgetController, ControllerConfig
from controller.policy import default_ladder
from controller.signals import GpuSampler, LatencyWindow, PromQLReader


def test_nvml_absent_reports_unavailable_and_controller_still_decides():
    gpu = GpuSampler()  # the real nvidia-ml-py: no driver on this machine
    assert not gpu.available and "NVMLError" in gpu.snapshot().reason  # the library is installed, no driver
    controller = BudgetController(default_ladder(24), gpu=gpu.start())
    assert controller.memory_cap() == 0
    assert controller.choose([1.0] * 5, 10.0, 0.0).level == 0


class FakeNVML:
    """The functions of pynvml the sampler uses, for a machine with one GPU at `used` memory."""

    def __init__(self, used: float):
        self.used = used

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=87)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=int(self.used * 80e9), total=int(80e9))


def test_gpu_memory_above_threshold_caps_quality():
    nvml = FakeNVML(used=0.5)
    gpu = GpuSampler(nvml=nvml)
    controller = BudgetController(default_ladder(24), ControllerConfig(memory_threshold=0.9), gpu=gpu)
    gpu.sample_once()
    assert gpu.snapshot().utilization == 0.87 and controller.memory_cap() == 0
    nvml.used = 0.95
    gpu.sample_once()
    decision = controller.choose([1.0] * 5, 10.0, 0.0)
    assert controller.memory_cap() == 3 and decision.level == 3 and "GPU memory" in decision.reason


def test_latency_window_quantile_and_expiry():
    now = [0.0]
    window = LatencyWindow(window_s=10, clock=lambda: now[0])
    for i in range(100):
        window.add(i / 100)
    assert window.quantile(0.95) == (0.94, 100)
    now[0] = 11
    assert window.quantile(0.95) == (None, 0)


def test_prometheus_unreachable_falls_back_to_the_window():
    reader = PromQLReader("http://127.0.0.1:9", "up", timeout_s=0.5)  # nothing listens on port 9
    assert reader.fetch().value is None and reader.latest().error
    controller = BudgetController(default_ladder(24), prometheus=reader)
    for _ in range(10):
        controller.window.add(0.5)
    assert controller.p95()[:2] == (0.5, "window")


def test_feedback_uses_latency_as_a_share_of_each_requests_slo():
    now = [0.0]
    controller = BudgetController(default_ladder(24), ControllerConfig(slo_s=1.0), clock=lambda: now[0])
    for _ in range(20):  # 2 s requests with a 10 s SLO are well within it, though over the 1 s default
        controller.observe(2.0, slo_s=10.0)
    now[0] = 10.0
    controller.tick()
    assert controller.status().p95_ratio == 0.2 and controller.feedback.margin < 1.2


def test_only_controlled_requests_steer_the_margin():
    now = [0.0]
    controller = BudgetController(default_ladder(24), ControllerConfig(slo_s=1.0), clock=lambda: now[0])
    for _ in range(20):
        controller.observe(5.0, controlled=False)  # explicit plans far over the SLO: not the controller's doing
    now[0] = 10.0
    controller.tick()
    assert controller.feedback.margin == 1.2 and controller.window.quantile(0.95) == (None, 0)
