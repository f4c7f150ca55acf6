"""Reading another process's memory for leftovers (Linux /proc; root, or a parent with ptrace rights).

    hits = marker_hits(pid, {"first": b"PLAINTEXT-...", ...})   # occurrences of each marker

Every readable mapping is read through /proc/PID/mem, except the kernel's
[vvar]/[vsyscall]/[vdso]; a mapping that cannot be read is skipped.
"""

import re
from pathlib import Path

_KERNEL_MAPPINGS = ("[vvar]", "[vsyscall]", "[vdso]")


def readable_regions(pid: int):
    """(start, end) of each readable mapping."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        name = fields[5] if len(fields) > 5 else ""
        if "r" in fields[1] and name not in _KERNEL_MAPPINGS:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            yield start, end


def marker_hits(pid: int, markers: dict[str, bytes]) -> dict[str, int]:
    """Occurrences of each marker in the process's readable memory."""
    hits = dict.fromkeys(markers, 0)
    pattern = re.compile(b"|".join(re.escape(m) for m in markers.values()))
    name_of = {marker: name for name, marker in markers.items()}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for start, end in readable_regions(pid):
            try:
                memory.seek(start)
                data = memory.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for found in pattern.finditer(data or b""):
                hits[name_of[found.group()]] += 1
    return hits
