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
    """RSS high-water mark since the process started or since `reset_peak()`, MiB: VmHWM, which `reset_peak` resets.
    Not ru_maxrss where /proc is readable: the kernel folds the high-water mark into the process's record when any of
    its threads exits, so ru_maxrss can keep a peak from before the reset (seen once in a test: 848 MB for ~170)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**10
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
