"""Compile a kernel to PTX and SASS without a GPU, and read what matters off the result.

PTX comes from numba (libNVVM from the pip wheels), the cubin from nvJitLink
(``cuda.core.Linker``), the SASS from ``cuobjdump`` of the ``nvidia-cuda-cuobjdump``
wheel (it runs ``nvdisasm``, from ``nvidia-cuda-nvdisasm``), or ones on PATH.
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


def _tool(name):
    try:
        import nvidia

        for root in nvidia.__path__:
            for cand in Path(root).glob(f"cu*/bin/{name}"):
                return str(cand)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: pip install nvidia-cuda-{name} (apnumba's 'test' extra)")
    return found


@functools.lru_cache(maxsize=None)
def cuobjdump():
    return _tool("cuobjdump")


@functools.lru_cache(maxsize=None)
def _tool_env():
    """cuobjdump finds nvdisasm through NVDISASM_PATH (the wheels keep it beside cuobjdump, off PATH)."""
    nvdisasm = _tool("nvdisasm")
    env = dict(os.environ)
    env["NVDISASM_PATH"] = os.path.dirname(nvdisasm)
    env["PATH"] = os.path.dirname(nvdisasm) + os.pathsep + env.get("PATH", "")
    return env


def compile_kernel(pyfunc, signature, cc=(9, 0), launch_bounds=None):
    """PTX and SASS of ``pyfunc`` (a kernel's Python function) for compute capability ``cc``
    ((9, 0, "a") for sm_90a, whose wgmma a plain sm_90 build rejects).  ``pyfunc`` may be a kernel
    (``cuda.jit`` dispatcher): its launch bounds, if any, apply."""
    if launch_bounds is None and hasattr(pyfunc, "py_func"):
        launch_bounds = pyfunc.targetoptions.get("launch_bounds")
    pyfunc = getattr(pyfunc, "py_func", pyfunc)
    from cuda.core import Linker, LinkerOptions, ObjectCode

    ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=cc, launch_bounds=launch_bounds)
    linker = Linker(ObjectCode.from_ptx(ptx.encode()), options=LinkerOptions(arch=f"sm_{cc[0]}{cc[1]}{''.join(cc[2:])}", verbose=True))
    cubin = linker.link("cubin")
    log = linker.get_info_log() or ""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin.code)
        def run(*args):
            proc = subprocess.run([cuobjdump(), *args, path], capture_output=True, text=True, env=_tool_env())
            if proc.returncode:
                raise RuntimeError(f"cuobjdump {' '.join(args)} failed: {proc.stderr.strip()[:500]}")
            return proc.stdout

        sass = run("-sass")
        usage = run("--dump-resource-usage")

    def field(pattern, text):
        """The largest value over the cubin's functions (the kernel, and any helper routines)."""
        return max((int(v) for v in re.findall(pattern, text)), default=0)

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
