"""Training across emulated hosts (benchmarks/multihost/hosts.sh): network namespaces as nodes.

A module fixture builds two hosts with their own prefix and subnet, links shaped to 1 Gbit/s,
and tears them down at the end. mpiexec (MPICH's hydra) starts the ranks of
``tests/multihost_job.py`` on them through its ssh launcher with ``on_host.sh`` as the
"ssh". Checked, at 1 and 2 ranks per host:

* the losses are those of the single-host run (one rank, the same global batches);
* the hosts are separate nodes to MPI and to hpctrain (host names, node-local ranks), and
  the shared window spans exactly the ranks of one host (``stats()`` names the exchange,
  the window's members come from its arena);
* every byte the sparse exchange must move between hosts crossed the emulated link: the
  link counters of each host's eth0 are at least the counts, ids, gradients and rows its
  ranks exchanged with ranks of the other host (Alltoallv), while the same traffic
  between ranks of one host never touches it.

The hybrid mode's layouts across hosts (``tests/multihost_hybrid_job.py``): the server on host
1, the workers (one group of two, or two groups of one) on host 2, placed by the host file's
slots; and placement "per_node", one server beside one worker on each host. BSP losses
equal the same layout's on one host bit for bit (one group: the collective trainer's too),
and each host's eth0 carried at least the server <-> worker messages its ranks sent to the
other host.

Skips with the reason where namespaces cannot be made (not root, no iproute2/util-linux,
kernel without veth/bridge/tbf) or where mpiexec is not hydra.
"""
import json
import os
import subprocess
import tempfile

import numpy as np
import pytest

from mpirun import ROOT, mpiexec, run_mpi

pytestmark = pytest.mark.multihost

HOSTS_SH = os.path.join(ROOT, "benchmarks", "multihost", "hosts.sh")
JOB = os.path.join(ROOT, "tests", "multihost_job.py")
NHOSTS = 2


def _sh(*args, env, timeout=60):
    return subprocess.run([HOSTS_SH, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def hosts():
    """Two emulated hosts (own name prefix and subnet); yields the environment for ``env``."""
    if mpiexec() is None:
        pytest.skip("no mpiexec found (install with: pip install -e '.[mpich]')")
    version = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    if "HYDRA" not in version:
        pytest.skip("emulated hosts start ranks through MPICH's hydra launcher; "
                    f"{mpiexec()} is not hydra")
    tag = os.getpid() % 100000
    env = dict(os.environ, HPCTRAIN_MH_PREFIX=f"hpt{tag}",
               HPCTRAIN_MH_NET=f"10.214.{tag % 250}")
    check = _sh("check", env=env)
    if check.returncode == 3:
        pytest.skip(f"no emulated hosts here: {(check.stderr or check.stdout).strip()}")
    assert check.returncode == 0, check.stdout + check.stderr
    up = _sh("up", str(NHOSTS), "1gbit", env=env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env
    finally:
        down = _sh("down", env=env)
        assert down.returncode == 0, down.stdout + down.stderr


def _hydra_env(env, per_host):
    out = _sh("env", str(per_host), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    exports = dict(line[len("export "):].split("=", 1) for line in out.stdout.splitlines()
                   if line.startswith("export "))
    return dict(exports, HPCTRAIN_MH_PREFIX=env["HPCTRAIN_MH_PREFIX"])


def _run_job(env, per_host):
    with tempfile.TemporaryDirectory(prefix="hpctrain-multihost-") as tmp:
        out = os.path.join(tmp, "job.json")
        run_mpi(NHOSTS * per_host, [JOB, out], timeout=120, env=_hydra_env(env, per_host))
        with open(out) as f:
            return json.load(f)


@pytest.mark.parametrize("per_host", [1, 2])
def test_training_across_hosts(hosts, per_host):
    job = _run_job(hosts, per_host)
    ranks = job["ranks"]
    size = NHOSTS * per_host

    # the losses of the single-host run
    assert len(job["losses"]) == 6
    np.testing.assert_allclose(job["losses"], job["reference_losses"], rtol=1e-5)

    # separate nodes: host names, node-local ranks, MPI's shared-memory split
    prefix = hosts["HPCTRAIN_MH_PREFIX"]
    names = [r["host"] for r in ranks]
    assert sorted(set(names)) == [f"{prefix}-h{k + 1}" for k in range(NHOSTS)], names
    for r in ranks:
        on_host = [q["rank"] for q in ranks if q["host"] == r["host"]]
        assert r["local_size"] == per_host and len(on_host) == per_host
        # the shared window inside each host, and only there
        assert r["stats"]["exchange"] == "shm", r["stats"]
        assert r["window_members"] == on_host, (r["rank"], r["window_members"], on_host)
        # the exchange's own statistics: rows and gradients crossed to the other host by
        # Alltoallv, and (with two ranks on a host) to the host's peer through the window
        moved = r["stats"]["bytes_sent"]
        assert moved["alltoallv"]["rows"] > 0 and moved["alltoallv"]["grads"] > 0, moved
        assert (moved["window"]["rows"] > 0) == (per_host > 1), moved

    # Alltoallv between hosts: what the exchange moved to ranks of other hosts crossed eth0
    sent = np.array([r["payload"]["sent"] for r in ranks])   # [requester, owner]
    rows = np.array([r["payload"]["rows"] for r in ranks])   # [requester, owner]
    assert sent.shape == rows.shape == (size, size)
    for host in sorted(set(names)):
        mine = np.array([n == host for n in names])
        eth0 = next(r["eth0"] for r in ranks if r["host"] == host and r["local_rank"] == 0)
        assert eth0 is not None, f"{host}: no eth0 counters (not in a network namespace?)"
        out_bytes = sent[np.ix_(mine, ~mine)].sum() + rows[np.ix_(~mine, mine)].sum()
        in_bytes = sent[np.ix_(~mine, mine)].sum() + rows[np.ix_(mine, ~mine)].sum()
        assert out_bytes > 100_000 and in_bytes > 100_000, (host, out_bytes, in_bytes)
        assert eth0["tx"] >= out_bytes, (host, eth0, out_bytes)
        assert eth0["rx"] >= in_bytes, (host, eth0, in_bytes)



HYBRID_JOB = os.path.join(ROOT, "tests", "multihost_hybrid_job.py")


def _run_hybrid(env, slots, servers, groups, placement):
    """The hybrid job on ``slots`` ranks per host (host file order), or on this host (env None)."""
    with tempfile.TemporaryDirectory(prefix="hpctrain-multihost-") as tmp:
        out = os.path.join(tmp, "job.json")
        job_env = None
        if env is not None:
            job_env = _hydra_env(env, 1)
            hostfile = os.path.join(tmp, "hosts")
            with open(hostfile, "w") as f:
                f.writelines(f"{env['HPCTRAIN_MH_PREFIX']}-h{k + 1}:{n}\n"
                             for k, n in enumerate(slots))
            job_env["HYDRA_HOST_FILE"] = hostfile
        run_mpi(sum(slots), [HYBRID_JOB, out, str(servers), str(groups), placement],
                timeout=120, env=job_env)
        with open(out) as f:
            return json.load(f)


@pytest.mark.parametrize("slots,servers,groups,placement", [
    ([1, 2], 1, 1, "first"), ([1, 2], 1, 2, "first"), ([2, 2], 2, 1, "per_node")],
    ids=["server-host-one-group", "server-host-two-groups", "per-node-servers"])
def test_hybrid_layouts_across_hosts(hosts, slots, servers, groups, placement):
    """The server on host 1 and the workers (one group of 2, or 2 groups of 1) on host 2
    ("first", host file slots 1 + 2); or one server beside one worker on each host
    ("per_node", 2 + 2). BSP, s = 0."""
    job = _run_hybrid(hosts, slots, servers, groups, placement)
    ranks = job["ranks"]
    prefix = hosts["HPCTRAIN_MH_PREFIX"]
    expect = {"first": ["server", "worker", "worker"],
              "per_node": ["server", "worker", "server", "worker"]}[placement]
    assert [r["role"] for r in ranks] == expect
    assert [r["host"] for r in ranks] == [f"{prefix}-h{k + 1}" for k, n in enumerate(slots)
                                          for _ in range(n)]
    workers = sorted((r for r in ranks if r["role"] == "worker"), key=lambda r: r["index"])
    assert sorted({r["group"] for r in workers}) == list(range(groups))

    # the same layout on one host: the same losses, bit for bit (BSP is deterministic)
    ref = _run_hybrid(None, slots, servers, groups, placement)
    ref_workers = sorted((r for r in ref["ranks"] if r["role"] == "worker"),
                         key=lambda r: r["index"])
    assert len(ref_workers) == len(workers)
    for a, b in zip(workers, ref_workers):
        assert len(a["losses"]) == 6
        assert a["losses"] == b["losses"] and a["loss_parts"] == b["loss_parts"], (a, b)
    if groups == 1:
        # one group at s = 0 is the collective trainer on the workers, bit for bit
        for w in workers:
            assert w["losses"] == job["collective_losses"]

    # server <-> worker messages crossed the link: every pull, push and reply went between
    # the hosts, so each host's eth0 carried at least what its ranks sent to the other
    sent = np.array([r["p2p_sent"] for r in ranks])          # [sender, receiver]
    names = [r["host"] for r in ranks]
    for host in sorted(set(names)):
        mine = np.array([n == host for n in names])
        eth0 = next((r["eth0"] for r in ranks if r["host"] == host and r["eth0"]), None)
        assert eth0 is not None, f"{host}: no eth0 counters (not in a network namespace?)"
        out_bytes = sent[np.ix_(mine, ~mine)].sum()
        in_bytes = sent[np.ix_(~mine, mine)].sum()
        assert out_bytes > 10_000 and in_bytes > 10_000, (host, out_bytes, in_bytes)
        assert eth0["tx"] >= out_bytes, (host, eth0, out_bytes)
        assert eth0["rx"] >= in_bytes, (host, eth0, in_bytes)


def test_teardown_is_idempotent_and_complete():
    """``down`` twice is fine and leaves nothing of its prefix behind."""
    env = dict(os.environ, HPCTRAIN_MH_PREFIX=f"hpu{os.getpid() % 100000}",
               HPCTRAIN_MH_NET=f"10.215.{os.getpid() % 250}")
    check = _sh("check", env=env)
    if check.returncode == 3:
        pytest.skip(f"no emulated hosts here: {(check.stderr or check.stdout).strip()}")
    try:
        assert _sh("up", "2", "10gbit", env=env).returncode == 0
        assert _sh("status", env=env).returncode == 0
        assert _sh("rate", "1gbit", env=env).returncode == 0
    finally:
        assert _sh("down", env=env).returncode == 0
    assert _sh("down", env=env).returncode == 0
    assert _sh("status", env=env).returncode == 1
    prefix = env["HPCTRAIN_MH_PREFIX"]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in links and prefix not in spaces
