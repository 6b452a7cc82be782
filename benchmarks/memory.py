"""Process memory for the benchmarks: current RSS and a resettable RSS high-water mark (Linux)."""

import resource


def rss_mb() -> float:
    """Resident set size now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak() -> bool:
    """Start the RSS high-water mark (VmHWM, and so ru_maxrss) again from the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb() -> float:
    """RSS high-water mark since the process started or since `reset_peak()`, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
