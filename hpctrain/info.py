"""``hpctrain info``: versions, MPI/OpenMP/GPU environment and the layout of the world.

Run it the way a job runs (``mpiexec -n N python -m mpi4py -m hpctrain info`` or
``srun ... python -m hpctrain info``): rank 0 prints one summary with a line per
rank. It fails when Slurm started several tasks that each became a 1-rank MPI
world (``srun`` without the right ``--mpi=`` plugin).
"""
import argparse
import json
import os
import pkgutil
import platform
import sys

def _mpi_facts():
    from hpctrain.comm.world import library_facts
    facts = library_facts()
    facts.pop("mpi_library_line")
    facts["direct_mpi"] = _direct_mpi()
    return facts


def _direct_mpi():
    """Which MPI calls hpctrain makes from C (hpctrain.comm.direct), in words."""
    from mpi4py import MPI

    from hpctrain.comm import direct
    if not direct.enabled():
        return "off (HPCTRAIN_DIRECT_MPI), every call through mpi4py"
    try:
        bound = [name for name, bind in (("MPI_Allreduce", direct.direct_allreduce),
                                         ("MPI_Alltoallv", direct.direct_alltoallv))
                 if bind(MPI.COMM_SELF) is not None]
    except ImportError:         # kernels missing: the kernels line says so
        return "off (kernels missing), every call through mpi4py"
    return (f"{', '.join(bound)} called from C" if bound
            else "none found to call, every call through mpi4py")


def _h5py_facts():
    try:
        import h5py
    except ImportError as exc:
        return {"h5py": f"not importable ({exc})"}
    return {"h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version}


def _kernel_facts():
    try:
        import hpctrain._kernels as kernels
        from hpctrain._kernels import _build, _openmp, table
    except ImportError as exc:      # missing, or built for another CPU: reported, info fails
        return {"kernels": [], "openmp": None, "kernels_error": str(exc)}
    names = sorted(m.name for m in pkgutil.iter_modules(kernels.__path__))
    return {"kernels": names, "openmp": _openmp.openmp_enabled(),
            "openmp_version": _openmp.openmp_version(), "threads": _openmp.get_num_threads(),
            "kernel_flags": _build.FLAGS, "kernel_isa": list(_build.ISA),
            "kernel_simd": table.simd_level()}


def _isa_line(f):
    """What the kernels were compiled for (the architecture's baseline or the extensions
    beyond it, and the flags), and the variant of the row updates chosen at run time."""
    if "kernel_flags" not in f:
        return "-"
    isa = " + " + ", ".join(f["kernel_isa"]) if f["kernel_isa"] else " baseline"
    return (f"{f['machine']}{isa} (flags: {f['kernel_flags']}); optimizer row updates "
            f"{f['kernel_simd']}")


def _cuda_version(v):
    return f"{v // 1000}.{(v % 1000) // 10}" if v else None


def _gpu_facts():
    from hpctrain.dense.device import tf32_enabled
    base = {"cupy": None, "gpus": [], "gpu_bus_ids": [], "nccl": None, "cuda_runtime": None,
            "cuda_driver": None, "tf32": tf32_enabled(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        import cupy
    except ImportError:
        return {**base, "gpu_note": "CuPy not installed (pip install 'hpctrain[gpu]')"}
    out = {**base, "cupy": cupy.__version__}
    rt = cupy.cuda.runtime
    try:
        out["cuda_runtime"] = _cuda_version(rt.runtimeGetVersion())
        out["cuda_driver"] = _cuda_version(rt.driverGetVersion())
        for i in range(rt.getDeviceCount()):
            name = rt.getDeviceProperties(i)["name"]
            out["gpus"].append(name.decode() if isinstance(name, bytes) else str(name))
            out["gpu_bus_ids"].append(cupy.cuda.Device(i).pci_bus_id)
    except Exception as exc:  # noqa: BLE001 - no driver, no device: report, do not fail
        out["gpu_note"] = f"no usable GPU ({type(exc).__name__}: {exc})"
    try:
        from cupy.cuda import nccl
        out["nccl"] = nccl.get_version()
    except Exception as exc:  # noqa: BLE001
        out["nccl_note"] = f"NCCL not usable ({type(exc).__name__}: {exc})"
    return out


def collect(mpi_comm):
    """Everything ``info`` reports, as a dict (collective over ``mpi_comm``)."""
    import numpy

    import hpctrain
    from hpctrain.comm.topology import device_for_local_rank, node_local, ranks_per_host
    from hpctrain.threads import threads_per_rank
    local_rank, local_size, hosts = node_local(mpi_comm)
    # what the trainer will use on this rank (hpctrain.threads: config aside, the same rule)
    threads, threads_from = threads_per_rank(None, local_size)
    facts = {"hpctrain": hpctrain.__version__, "python": platform.python_version(),
             "python_executable": sys.executable, "numpy": numpy.__version__,
             "machine": platform.machine(),
             **_mpi_facts(), **_h5py_facts(), **_kernel_facts(), **_gpu_facts()}
    # the GPU this rank trains on with device = "gpu" (as hpctrain.dense.device picks it),
    # named by its PCI bus id: under srun --gpus-per-task every rank's index is 0
    gpu = device_for_local_rank(local_rank, len(facts["gpus"])) if facts["gpus"] else None
    me = {"rank": mpi_comm.rank, "host": hosts[mpi_comm.rank], "pid": os.getpid(),
          "local_rank": local_rank, "local_size": local_size,
          "threads": threads, "threads_from": threads_from, "gpu": gpu,
          "gpu_name": None if gpu is None else facts["gpus"][gpu],
          "gpu_bus_id": None if gpu is None else facts["gpu_bus_ids"][gpu],
          "cuda_visible_devices": facts["cuda_visible_devices"]}
    facts["world_size"] = mpi_comm.size
    facts["hosts"] = {h: len(r) for h, r in ranks_per_host(hosts).items()}
    facts["ranks"] = mpi_comm.gather(me, root=0)
    if mpi_comm.rank == 0:
        from hpctrain.comm.shmclean import stale_segments
        stale = stale_segments()
        facts["stale_shm_segments"] = len(stale)
        facts["stale_shm_bytes"] = sum(n for _, n in stale)
    return facts


def _nccl_text(f):
    v = f["nccl"]
    if not v:
        return f.get("nccl_note", "not usable (needs CuPy)")
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v >= 10000 else str(v)


def format_summary(f):
    """The human-readable summary of ``collect``'s dict."""
    omp = ("not built" if f["openmp"] is None else
           f"OpenMP {f['openmp_version']}" if f["openmp"]
           else "without OpenMP, 1 thread")
    gpus = ", ".join(f"{i}: {n}" for i, n in enumerate(f["gpus"])) or f.get("gpu_note", "none")
    lines = [
        f"hpctrain      {f['hpctrain']}",
        f"Python        {f['python']} ({f['python_executable']})",
        f"NumPy         {f['numpy']}",
        f"mpi4py        {f['mpi4py']}",
        f"MPI           {f['mpi_library']} (MPI {f['mpi_standard']}), thread level "
        f"{f['thread_level']} (requested {f['thread_level_requested']})"
        + (f"; direct calls: {f['direct_mpi']}" if f.get("direct_mpi") else ""),
        f"h5py          {f['h5py']}" + (f" (HDF5 {f['hdf5']})" if "hdf5" in f else ""),
        f"kernels       {', '.join(f['kernels'])} ({omp})" if "kernels_error" not in f
        else f"kernels       ERROR: {f['kernels_error']}",
        f"kernel ISA    {_isa_line(f)}",
        f"CuPy          {f['cupy'] or 'not installed'}",
        f"GPUs          {gpus}",
        f"NCCL          {_nccl_text(f)}",
        f"CUDA          " + (f"runtime {f['cuda_runtime']}, driver {f['cuda_driver']}"
                             if f["cuda_runtime"] else "-")
        + f"; TF32 {'on' if f['tf32'] else 'off'} (CUPY_TF32)",
        f"world size    {f['world_size']} on {len(f['hosts'])} host(s): "
        + ", ".join(f"{h} ({n} ranks)" for h, n in f["hosts"].items()),
    ]
    if f.get("stale_shm_segments"):
        lines.append(f"/dev/shm      {f['stale_shm_segments']} stale MPI segment(s) of dead jobs, "
                     f"{f['stale_shm_bytes'] / 2**20:.1f} MiB: remove with `hpctrain clean`")
    for r in f["ranks"]:
        gpu = "-" if r["gpu"] is None else f"{r['gpu']} ({r['gpu_name']}, {r['gpu_bus_id']})"
        lines.append(f"  rank {r['rank']:<4} host {r['host']}  local {r['local_rank']}/"
                     f"{r['local_size']}  pid {r['pid']}  threads {r['threads']} ({r['threads_from']})  gpu {gpu}")
    return "\n".join(lines)


def main(argv=None):
    """Print the summary on rank 0; returns the exit code (1 on a broken launch or when
    the kernels cannot be used)."""
    p = argparse.ArgumentParser(prog="hpctrain info", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = p.parse_args(argv)
    from hpctrain.comm.topology import check_launch
    from hpctrain.comm.world import mpi_world
    from hpctrain.errors import CommError
    comm = mpi_world()
    try:
        check_launch(comm)
    except CommError as exc:
        print(f"hpctrain info: error: {exc}", file=sys.stderr)
        return 1
    facts = collect(comm)
    if comm.rank == 0:
        print(json.dumps(facts, indent=1) if args.json else format_summary(facts), flush=True)
    if "kernels_error" in facts:
        if comm.rank == 0:
            print(f"hpctrain info: error: {facts['kernels_error']}", file=sys.stderr, flush=True)
        return 1
    return 0
