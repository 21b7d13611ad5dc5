"""What this CPU is and can do, read once from /proc/cpuinfo (x86-64 Linux; elsewhere nothing is
known and the baseline of the architecture is assumed): its vendor (the CPU GEMM route depends on
it) and the instruction sets the host kernels can be built for (``$SRU_CUPY_HOST_ISA`` chooses a
lower one)."""

import functools
import os
import sys

#: Environment variable that sets the instruction set of the host build to one the CPU has (one of
#: ISAS; e.g. ``baseline`` for code that runs on any CPU of the architecture).
ISA_ENV_VAR = "SRU_CUPY_HOST_ISA"

#: Instruction sets the host build targets, best first, and the /proc/cpuinfo flags a CPU needs for
#: each.
ISAS = ("avx512", "avx2", "baseline")
ISA_CPU_FLAGS = {
    "avx512": ("avx512f", "avx512dq", "avx512vl", "avx512bw", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "baseline": (),
}


@functools.lru_cache(maxsize=None)
def cpuinfo():
    """The fields of the first processor in /proc/cpuinfo on x86-64 Linux ({} elsewhere)."""
    fields = {}
    if sys.platform.startswith("linux") and os.uname().machine in ("x86_64", "amd64"):
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                for line in f:
                    if not line.strip():
                        break
                    name, _, value = line.partition(":")
                    fields.setdefault(name.strip(), value.strip())
        except OSError:
            pass
    return fields


def vendor():
    """The x86-64 CPU's vendor string ("GenuineIntel", "AuthenticAMD", ...), or None where
    /proc/cpuinfo does not say (other systems and architectures)."""
    return cpuinfo().get("vendor_id")


@functools.lru_cache(maxsize=None)
def isas():
    """ISAS this CPU has, best first ("baseline" always)."""
    flags = set(cpuinfo().get("flags", "").split())
    return tuple(isa for isa in ISAS if all(flag in flags for flag in ISA_CPU_FLAGS[isa]))


def isa():
    """The best of ISAS this CPU has, or the one $SRU_CUPY_HOST_ISA names, which must be among
    them (a ValueError naming the variable otherwise)."""
    have = isas()
    wanted = os.environ.get(ISA_ENV_VAR)
    if wanted:
        if wanted not in have:
            raise ValueError(f"${ISA_ENV_VAR}: expected one of the instruction sets this CPU has "
                             f"{tuple(have)}, got {wanted!r}")
        return wanted
    return have[0]
