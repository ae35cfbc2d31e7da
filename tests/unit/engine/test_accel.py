"""Accelerator detection against fake /proc, /sys and /dev trees."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from supermachine.engine import accel
from supermachine.errors import AccelError

VMX = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr vmx sse2\n"
SVM = "processor\t: 0\nflags\t\t: fpu svm sse2\n"
NOVIRT = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr sse2 hypervisor\n"


def make_host(tmp_path: Path, cpuinfo: str, kvm: bool = True, pvm: bool = False,
              kvm_mode: int = 0o666) -> Path:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cpuinfo").write_text(cpuinfo)
    (tmp_path / "dev").mkdir()
    (tmp_path / "sys" / "module").mkdir(parents=True)
    if kvm:
        (tmp_path / "dev" / "kvm").write_text("")
        os.chmod(tmp_path / "dev" / "kvm", kvm_mode)
    if pvm:
        (tmp_path / "sys" / "module" / "kvm_pvm").mkdir()
    return tmp_path


def test_hardware_kvm_with_vmx(tmp_path):
    choice = accel.detect(make_host(tmp_path, VMX))
    assert choice.name == "kvm" and choice.hardware


def test_hardware_kvm_with_svm(tmp_path):
    assert accel.detect(make_host(tmp_path, SVM)).name == "kvm"


def test_pvm_host_falls_back_to_tcg_even_with_dev_kvm(tmp_path):
    choice = accel.detect(make_host(tmp_path, NOVIRT, pvm=True))
    assert choice.name == "tcg"
    assert "PVM" in choice.reason


def test_no_virt_flags_means_tcg(tmp_path):
    choice = accel.detect(make_host(tmp_path, NOVIRT))
    assert choice.name == "tcg" and "vmx/svm" in choice.reason


def test_no_dev_kvm_means_tcg(tmp_path):
    choice = accel.detect(make_host(tmp_path, VMX, kvm=False))
    assert choice.name == "tcg" and "no /dev/kvm" in choice.reason


def test_forced_tcg_and_unknown(tmp_path):
    host = make_host(tmp_path, VMX)
    assert accel.choose("tcg", host).name == "tcg"
    with pytest.raises(AccelError, match="unknown accelerator"):
        accel.choose("hvf", host)


def test_forced_kvm_on_pvm_host_is_a_clear_error(tmp_path):
    with pytest.raises(AccelError, match="PVM"):
        accel.choose("kvm", make_host(tmp_path, NOVIRT, pvm=True))


def test_this_machine_is_detected_from_its_own_facts():
    # Whatever the host, detection must match its facts (the CPU flags read here by grep): on
    # a PVM host, such as the workplace's, that is TCG for the PVM reason, never KVM.
    pvm = Path("/sys/module/kvm_pvm").is_dir()
    virt = subprocess.run(["grep", "-qwE", "vmx|svm", "/proc/cpuinfo"]).returncode == 0
    usable = Path("/dev/kvm").exists() and os.access("/dev/kvm", os.R_OK | os.W_OK)
    choice = accel.detect()
    if pvm:
        assert (choice.name, "PVM" in choice.reason) == ("tcg", True), choice
    else:
        assert choice.name == ("kvm" if virt and usable else "tcg"), choice
