"""Compile a kernel to PTX and SASS without a GPU, and read what matters off the result.

PTX comes from numba (libNVVM from the pip wheels), the cubin from nvJitLink
(``cuda.core.Linker``), the SASS from ``cuobjdump`` of the ``nvidia-cuda-cuobjdump``
wheel (or one on PATH).  Tests assert on these; ``bench.py`` reports registers.
"""

from dataclasses import dataclass
import collections
import functools
import os
from pathlib import Path
import re
import shutil
import subprocess
import tempfile

from numba import cuda


@dataclass
class Compiled:
    ptx: str
    sass: str
    registers: int
    stack_bytes: int
    local_bytes: int
    spill_bytes: int
    log: str

    def opcodes(self):
        """Counter of SASS opcodes (predicates stripped)."""
        return collections.Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", self.sass))


@functools.lru_cache(maxsize=None)
def cuobjdump():
    try:
        import nvidia

        for root in nvidia.__path__:
            for cand in Path(root).glob("cu*/bin/cuobjdump"):
                return str(cand)
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if not found:
        raise FileNotFoundError("cuobjdump not found: pip install nvidia-cuda-cuobjdump (the 'test' extra)")
    return found


def compile_kernel(pyfunc, signature, cc=(9, 0)):
    """PTX and SASS of ``pyfunc`` (a kernel's Python function) for compute capability ``cc``."""
    from cuda.core import Linker, LinkerOptions, ObjectCode

    ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=cc)
    linker = Linker(ObjectCode.from_ptx(ptx.encode()), options=LinkerOptions(arch=f"sm_{cc[0]}{cc[1]}", verbose=True))
    cubin = linker.link("cubin")
    log = linker.get_info_log() or ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin.code)
        sass = subprocess.run([cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run(
            [cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout

    def field(pattern, text):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    spills = field(r"(\d+) bytes spill stores", log) + field(r"(\d+) bytes spill loads", log)
    return Compiled(
        ptx=ptx,
        sass=sass,
        registers=field(r"REG:(\d+)", usage),
        stack_bytes=field(r"STACK:(\d+)", usage),
        local_bytes=field(r"LOCAL:(\d+)", usage),
        spill_bytes=spills,
        log=log,
    )
