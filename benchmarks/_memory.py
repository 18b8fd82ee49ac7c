"""Memory of processes, from /proc (Linux): RSS, peak RSS, PSS, and the part of it that maps given files."""

from __future__ import annotations

import resource


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pss_mb(pid: int) -> tuple[float, float]:
    """(PSS, private) of process ``pid`` in MB, from /proc/PID/smaps_rollup."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"]


def mapped_mb(pid: int, folder: str) -> tuple[float, float]:
    """(RSS, PSS) in MB of process ``pid``'s mappings of files under ``folder``, from /proc/PID/smaps."""
    rss = pss = 0.0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):  # a mapping's header line
                inside = len(parts) >= 6 and parts[5].startswith(folder)
            elif inside and parts[0] == "Rss:":
                rss += int(parts[1]) / 1024
            elif inside and parts[0] == "Pss:":
                pss += int(parts[1]) / 1024
    return rss, pss
