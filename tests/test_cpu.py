"""What this CPU is (sru_cupy/cpu.py): its vendor and the instruction sets the host kernels can be
built for, read from /proc/cpuinfo, and the one $SRU_CUPY_HOST_ISA asks for."""

import os

import pytest

from sru_cupy import cpu


def test_cpu_isa_is_the_best_the_cpu_has_or_the_one_asked_for(monkeypatch):
    """The build targets the best instruction set of the CPU, or the one $SRU_CUPY_HOST_ISA names
    if the CPU has it (an error naming the variable otherwise); each has its columns per thread."""
    monkeypatch.delenv(cpu.ISA_ENV_VAR, raising=False)
    have = cpu.isas()
    assert have[-1] == "baseline" and cpu.isa() == have[0]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx512f " in flags and " avx512bw " in flags and os.uname().machine == "x86_64":
        assert have[0] == "avx512"
    monkeypatch.setenv(cpu.ISA_ENV_VAR, "baseline")
    assert cpu.isa() == "baseline"
    monkeypatch.setattr(cpu, "isas", lambda: ("avx2", "baseline"))
    monkeypatch.setenv(cpu.ISA_ENV_VAR, "avx512")
    with pytest.raises(ValueError, match=r"\$SRU_CUPY_HOST_ISA: expected one of .*'avx2'.*got 'avx512'"):
        cpu.isa()


def test_vendor_is_read_from_cpuinfo_on_x86_64_linux():
    vendor = cpu.vendor()
    if os.path.exists("/proc/cpuinfo") and os.uname().machine == "x86_64":
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("vendor_id"))
        assert vendor == line.split(":", 1)[1].strip()
    else:
        assert vendor is None
