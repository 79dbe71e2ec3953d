"""Loaded at start-up by the Python of a test's server (clock_step.py puts this folder on its PYTHONPATH).

With POSTTRAIN_TEST_CLOCK_STEP_FILE set, this process sees the wall clock stepped by the seconds that file
holds (none while it does not exist): the boot time psutil reads from /proc/stat, to which it adds every
process's start time, is moved by that much. A real step (NTP, a virtual machine resumed) moves it the
same way; stepping the real clock needs root and would disturb everything else running on the machine.
"""

import os

_STEP_FILE = os.environ.get("POSTTRAIN_TEST_CLOCK_STEP_FILE")

if _STEP_FILE:
    import psutil._pslinux  # the boot time behind psutil.boot_time() and Process.create_time()

    _real_boot_time = psutil._pslinux.boot_time

    def _stepped_boot_time() -> float:
        try:
            with open(_STEP_FILE) as step:
                return _real_boot_time() + float(step.read())
        except (OSError, ValueError):
            return _real_boot_time()

    psutil._pslinux.boot_time = _stepped_boot_time
