"""AVX2-CPU emulation for timing only (bench/avx2/run.sh puts this folder on PYTHONPATH).

Not a real AVX2 machine: on this AVX-512 one it takes away what an AVX2-only CPU lacks, as far as torch and
qlora-dist can tell. ATEN_CPU_CAPABILITY=avx2 (set by run.sh) makes ATen's vector kernels AVX2 ones; here,
once torch is imported, oneDNN is switched off, so a bf16 matmul falls back to ATen's own gemm as it does
where oneDNN has no bf16 kernels (measured on the idle machine: 2.5 GFLOP/s bf16 vs 89 fp32, one thread,
512x576x1536, against 1.3 vs 66 on a real AVX2 EPYC); and qlora_dist.precision sees no native-bf16 flag,
so `compute_dtype=auto` picks float32 as it would there. bitsandbytes' own CPU kernels are not emulated.
"""
import importlib.abc
import importlib.machinery
import sys

_NO_NATIVE_BF16 = ("avx512", "amx")


def _after_torch(module):
    module.backends.mkldnn.enabled = False


def _after_precision(module):
    read = module.cpu_flags
    default = read.__defaults__[0]

    def cpu_flags(cpuinfo=default):
        flags = read(cpuinfo)
        if cpuinfo != default:  # a test's own cpuinfo file: leave it as written
            return flags
        return {f for f in flags if not f.startswith(_NO_NATIVE_BF16)}

    module.cpu_flags = cpu_flags


_HOOKS = {"torch": _after_torch, "qlora_dist.precision": _after_precision}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.hook(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _HOOKS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, _HOOKS[name])
        return spec


sys.meta_path.insert(0, _Finder())
