"""Prometheus configuration and rules: promtool's own checks and rule unit tests."""

import shutil
import subprocess
from pathlib import Path

DEPLOY = Path(__file__).resolve().parents[2] / "deploy/prometheus"


def promtool(*args):
    binary = shutil.which("promtool")
    assert binary, "promtool is installed by scripts/setup.sh (Debian package prometheus)"
    return subprocess.run([binary, *args], cwd=DEPLOY, capture_output=True, text=True)


def test_config_and_rules_pass_promtool_check():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "aim-rules.yml")):
        proc = promtool(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_unit_tests():
    proc = promtool("test", "rules", "aim-rules.test.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_tests_can_fail(tmp_path):
    """A wrong expectation makes `promtool test rules` fail: the unit tests above are not vacuous."""
    broken = (DEPLOY / "aim-rules.test.yml").read_text().replace("value: 0.8}", "value: 0.5}")
    (tmp_path / "aim-rules.yml").write_text((DEPLOY / "aim-rules.yml").read_text())
    (tmp_path / "t.yml").write_text(broken)
    proc = subprocess.run([shutil.which("promtool"), "test", "rules", "t.yml"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode != 0
