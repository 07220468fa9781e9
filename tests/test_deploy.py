"""deploy/: the Docker image installs the package as CI does; the Kubernetes manifests are valid
dask-kubernetes operator resources that run our scheduler, workers and jobs; the SLURM launcher's
dask-jobqueue job scripts run our workers and its scheduler serves the live page."""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import os
import re
import shlex
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SLURM = DEPLOY / "slurm"
DASHBOARD_PRELOAD = "dask_refine.ui.dashboard"
DATA_CLAIM_MOUNT = "/data"


# --------------------------------------------------------------------------- helpers

def shell_commands(text: str, prefix: str = "") -> list[list[str]]:
    """Simple commands of a shell script or Dockerfile (``prefix``: the instruction, ``RUN``):
    continuation lines joined, comments dropped, split at ``&&``, ``||`` and ``;``."""
    text = re.sub(r"\\\n", " ", text)
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if prefix:
            if not line.startswith(prefix + " "):
                continue
            line = line[len(prefix) + 1:]
        for part in re.split(r"&&|\|\||;", line):
            tokens = shlex.split(part, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


COSMETIC_PIP_FLAGS = {"--quiet", "-q", "--no-cache-dir", "--progress-bar=off"}


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    """The ``python -m pip install`` commands, without flags that change only the output."""
    return [[t for t in c if t not in COSMETIC_PIP_FLAGS] for c in commands
            if c[:4] == ["python", "-m", "pip", "install"]]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def image_tag() -> str:
    """The tag in the Dockerfile's own build instructions (``docker build … -t TAG .``)."""
    tags = re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", (DEPLOY / "Dockerfile")
                      .read_text())
    assert len(tags) == 1, "the Dockerfile should say how to build it, with its tag, once"
    return tags[0]


def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.glob("*.yaml"))}


def documents(kind: str | None = None) -> list[tuple[str, dict]]:
    return [(name, d) for name, docs in manifests().items() for d in docs
            if kind is None or d["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict]]:
    """(cluster name, DaskCluster spec) of every DaskCluster and every DaskJob's cluster (the
    operator names a DaskJob's cluster after the job)."""
    specs = [(d["metadata"]["name"], d["spec"]) for _, d in documents("DaskCluster")]
    specs += [(d["metadata"]["name"], d["spec"]["cluster"]["spec"])
              for _, d in documents("DaskJob")]
    return specs


def pod_specs() -> list[tuple[str, dict]]:
    """(role, pod spec) of every pod the manifests describe."""
    pods = []
    for name, spec in cluster_specs():
        pods += [(f"{name} scheduler", spec["scheduler"]["spec"]),
                 (f"{name} worker", spec["worker"]["spec"])]
    pods += [(f"{d['metadata']['name']} job", d["spec"]["job"]["spec"])
             for _, d in documents("DaskJob")]
    pods += [(d["metadata"]["name"], d["spec"]) for _, d in documents("Pod")]
    return pods


def argv(container: dict) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


def option(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} should appear once in {args}"
    return args[args.index(name) + 1]


def dask_kubernetes_dir() -> Path:
    """The installed dask-kubernetes package (not imported: only its data and source are read,
    so its operator dependencies need not be installed)."""
    pytest.importorskip("dask_kubernetes")
    spec = importlib.util.find_spec("dask_kubernetes")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """``(apiVersion, kind)`` → openAPIV3Schema of the operator's CRDs."""
    crds = dask_kubernetes_dir() / "operator/deployment/helm/dask-kubernetes-operator/crds"
    schemas = {}
    for path in sorted(crds.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    assert {k for _, k in schemas} >= {"DaskCluster", "DaskJob", "DaskWorkerGroup"}
    return schemas


def strict(schema: dict, root: bool = True) -> dict:
    """The schema as the API server applies it to a ``kubectl apply`` (strict field validation):
    fields a structural schema does not list are errors, and every object may carry
    apiVersion/kind/metadata at its root."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    if root:
        schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"},
                                    metadata={"type": "object"})
    return schema


def crd_errors(document: dict, schemas, pod_spec: bool = False) -> list[str]:
    """Errors of a Dask resource against its CRD, or (``pod_spec``) of a pod spec against the
    pod spec schema the DaskJob CRD embeds."""
    import jsonschema

    if pod_spec:
        schema = schemas[("kubernetes.dask.org/v1", "DaskJob")]
        schema = strict(schema["properties"]["spec"]["properties"]["job"]["properties"]["spec"],
                        root=False)
    else:
        schema = strict(schemas[(document["apiVersion"], document["kind"])])
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(document)]


def load_launcher():
    spec = importlib.util.spec_from_file_location("refine_on_slurm", SLURM / "refine_on_slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def slurm_config(tmp_path):
    """cluster.yaml with the scheduler and its dashboard on loopback and logs in tmp_path."""
    config = yaml.safe_load((SLURM / "cluster.yaml").read_text())
    config["scheduler_options"].update(host="127.0.0.1", dashboard_address="127.0.0.1:0")
    for profile in config["profiles"].values():
        profile["log_directory"] = str(tmp_path / "logs")
        profile.pop("interface", None)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def job_script(launcher, config_path: Path, profile: str, capsys) -> tuple[str, list[str]]:
    """The launcher's ``--job-script`` output: (#SBATCH header, worker command tokens)."""
    assert launcher.main(["--config", str(config_path), "--profile", profile,
                          "--job-script"]) == 0
    script = capsys.readouterr().out
    header = "\n".join(line for line in script.splitlines() if line.startswith("#SBATCH"))
    body = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    assert len(body) == 1, script
    return header, shlex.split(body[0])


# --------------------------------------------------------------------------- Dockerfile

def test_dockerfile_installs_like_ci():
    """The image's pip commands are CI's, in the same order, with [gpu,cloud] for [test]."""
    # CI's installs of pip and of this package (test-only tools CI adds are not the image's)
    ci = [c for c in pip_installs(shell_commands((ROOT / ".ci/run").read_text()))
          if any(t == "pip" or t.startswith(".") for t in c[4:])]
    docker = pip_installs(shell_commands((DEPLOY / "Dockerfile").read_text(), prefix="RUN"))
    assert [".[test]"] in [c[4:] for c in ci], ci
    assert docker == [[".[gpu,cloud]" if t == ".[test]" else t for t in c] for c in ci], \
        (docker, ci)

    extras = pyproject()["project"]["optional-dependencies"]
    assert any(d.startswith("dask-cuda") for d in extras["gpu"])
    # CuPy's wheel is built for one CUDA major version: the base image must provide that one.
    cupy = next(d for d in extras["gpu"] if d.startswith("cupy-cuda"))
    major = re.match(r"cupy-cuda(\d+)x", cupy).group(1)
    base = re.search(r"^FROM (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert re.fullmatch(rf"nvidia/cuda:{major}\.\d+(\.\d+)?-\w+-ubuntu\d+\.\d+", base), base


def test_dockerfile_copies_what_the_install_needs():
    """The install runs in the folder the sources were copied to, and they include everything
    pyproject.toml names (the readme, the package)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    workdir, copied, copy_dirs, install_dirs = None, set(), set(), []
    for instruction, rest in re.findall(r"^(WORKDIR|COPY|RUN) (.*)$", text, re.M):
        if instruction == "WORKDIR":
            workdir = rest.strip()
        elif instruction == "COPY":
            *sources, dest = rest.split()
            assert dest.rstrip("/") in (".", "./" + sources[0].rstrip("/")), rest
            copied |= {s.rstrip("/") for s in sources}
            copy_dirs.add(workdir)
        elif '".[gpu,cloud]"' in rest:
            install_dirs.append(workdir)
    project = pyproject()
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= copied, needed - copied
    assert len(install_dirs) == 1 and copy_dirs == set(install_dirs), (copy_dirs, install_dirs)
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"\]$', text, re.M), \
        "the image has no program of its own (only an init)"


def test_image_tag_is_used_everywhere():
    tag = image_tag()
    containers = [c for _, pod in pod_specs() for c in pod["containers"]]
    assert len(containers) >= 8
    for c in containers:
        assert c["image"] == tag, c["name"]
        assert c["imagePullPolicy"] == "IfNotPresent"  # a locally loaded :latest image works
        # `args`, not `command`: the image's entrypoint (tini) stays in front of the command.
        assert "command" not in c and c["args"], c["name"]
    readme = (DEPLOY / "README.md").read_text()
    assert f"docker build -f deploy/Dockerfile -t {tag} ." in readme


# --------------------------------------------------------------------------- Kubernetes

def test_manifests_validate_against_operator_crds():
    schemas = crd_schemas()
    validated = []
    for name, doc in documents():
        if doc["apiVersion"].startswith("kubernetes.dask.org/"):
            assert (doc["apiVersion"], doc["kind"]) in schemas, (name, doc["kind"])
            assert not crd_errors(doc, schemas), (name, crd_errors(doc, schemas))
            validated.append(doc["kind"])
        elif doc["kind"] == "Pod":
            # no core schemas here, but the operator's CRDs embed the pod spec's schema
            assert doc["apiVersion"] == "v1"
            assert not crd_errors(doc["spec"], schemas, pod_spec=True), name
            validated.append("Pod")
        else:
            assert (doc["apiVersion"], doc["kind"]) == ("v1", "PersistentVolumeClaim"), name
    assert sorted(validated) == ["DaskCluster", "DaskCluster", "DaskJob", "Pod"]


def test_crd_validation_catches_mistakes():
    """The validation is strict enough to matter: a misspelt field, a resource quantity that is
    not a string and a missing required section are each reported."""
    schemas = crd_schemas()
    (_, cluster), = [(n, d) for n, d in documents("DaskCluster") if n == "daskcluster.yaml"]
    assert not crd_errors(cluster, schemas)

    typo = copy.deepcopy(cluster)
    typo["spec"]["worker"]["replica"] = typo["spec"]["worker"].pop("replicas")
    number = copy.deepcopy(cluster)
    number["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 1
    missing = copy.deepcopy(cluster)
    del missing["spec"]["scheduler"]["service"]
    for broken in (typo, number, missing):
        assert crd_errors(broken, schemas)


def test_schedulers_serve_the_refinement_page():
    specs = cluster_specs()
    assert {name for name, _ in specs} == {"dask-refine", "dask-refine-gpu", "refine"}
    for name, spec in specs:
        (container,) = spec["scheduler"]["spec"]["containers"]
        args = argv(container)
        assert args[:2] == ["dask", "scheduler"], name
        assert option(args, "--preload") == DASHBOARD_PRELOAD, name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}, name
        # The operator tells workers and jobs tcp://<cluster>-scheduler.<ns>.svc…:8786; the
        # Service it creates from this spec must select this cluster's scheduler pod.
        service = spec["scheduler"]["service"]
        assert service["selector"] == {"dask.org/cluster-name": name,
                                       "dask.org/component": "scheduler"}, name
        assert {(p["port"], p["targetPort"]) for p in service["ports"]} == {
            (8786, "tcp-comm"), (8787, "http-dashboard")}, name


def test_workers_one_thread_each_and_one_gpu_per_cuda_worker():
    kinds = {}
    for name, spec in cluster_specs():
        (container,) = spec["worker"]["spec"]["containers"]
        args = argv(container)
        limits = container["resources"]["limits"]
        assert option(args, "--nthreads") == "1", name
        assert option(args, "--name") == "$(DASK_WORKER_NAME)", name
        if args[:3] == ["dask", "cuda", "worker"]:
            kinds[name] = "gpu"
            assert limits["nvidia.com/gpu"] == "1", name
        else:
            kinds[name] = "cpu"
            assert args[:2] == ["dask", "worker"], name
            assert "nvidia.com/gpu" not in limits, name
            assert limits["cpu"] == "1", name  # one single-threaded worker process per core
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts.get("data") == DATA_CLAIM_MOUNT, name
    assert kinds == {"dask-refine": "cpu", "dask-refine-gpu": "gpu", "refine": "cpu"}


def operator_injected_env() -> dict[str, set[str]]:
    """Environment variables the installed operator adds to job pods and worker containers, read
    from its controller's source (``build_job_pod_spec``, ``build_worker_deployment_spec``)."""
    source = (dask_kubernetes_dir() / "operator/controller/controller.py").read_text()
    names = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name in ("build_job_pod_spec",
                                                                "build_worker_deployment_spec"):
            names[node.name] = {
                v.value for d in ast.walk(node) if isinstance(d, ast.Dict)
                for k, v in zip(d.keys, d.values)
                if isinstance(k, ast.Constant) and k.value == "name"
                and isinstance(v, ast.Constant) and str(v.value).startswith("DASK_")}
    return {"job": names["build_job_pod_spec"], "worker": names["build_worker_deployment_spec"]}


def test_environment_references_resolve():
    """Kubernetes leaves an undefined $(VAR) in args as it is: every reference must be defined in
    the container or injected by the operator."""
    injected = operator_injected_env()
    assert "DASK_SCHEDULER_ADDRESS" in injected["job"]
    assert {"DASK_SCHEDULER_ADDRESS", "DASK_WORKER_NAME"} <= injected["worker"]
    for role, pod in pod_specs():
        for c in pod["containers"]:
            defined = {e["name"] for e in c.get("env", [])}
            if role.endswith(" job"):
                defined |= injected["job"]
            elif role.endswith(" worker"):
                defined |= injected["worker"]
            for ref in re.findall(r"\$\((\w+)\)", " ".join(argv(c))):
                assert ref in defined, (role, ref)


def refine_args(container: dict):
    """The container's dask-refine command, parsed by dask-refine's own parser."""
    from dask_refine.ui.cli import build_parser

    args = argv(container)
    assert args[:2] == ["dask-refine", "refine"], args
    return build_parser().parse_args(args[1:])


def test_daskjob_runs_a_refinement_on_its_cluster():
    (_, job), = documents("DaskJob")
    (container,) = job["spec"]["job"]["spec"]["containers"]
    parsed = refine_args(container)
    assert parsed.scheduler == "$(DASK_SCHEDULER_ADDRESS)"
    assert parsed.dashboard and parsed.resume
    assert "DASK_SCHEDULER_ADDRESS" not in {e["name"] for e in container.get("env", [])}, \
        "the operator sets it to this job's cluster"
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    for path in (parsed.store, parsed.initial, parsed.out):
        assert any(path.startswith(m + "/") for m in mounts), path
    assert job["spec"]["job"]["spec"]["restartPolicy"] == "Never"


def test_driver_pod_targets_the_standing_cluster():
    (_, pod), = documents("Pod")
    (container,) = pod["spec"]["containers"]
    parsed = refine_args(container)
    assert parsed.scheduler == "$(DASK_SCHEDULER_ADDRESS)"
    env = {e["name"]: e.get("value") for e in container["env"]}
    (_, cluster), = [(n, d) for n, d in documents("DaskCluster") if n == "daskcluster.yaml"]
    assert env["DASK_SCHEDULER_ADDRESS"] == f"tcp://{cluster['metadata']['name']}-scheduler:8786"
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    for path in (parsed.store, parsed.initial, parsed.out):
        assert any(path.startswith(m + "/") for m in mounts), path


def test_volumes_are_one_shared_claim():
    (_, pvc), = documents("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    claims = set()
    for role, pod in pod_specs():
        for volume in pod.get("volumes", []):
            claims.add(volume["persistentVolumeClaim"]["claimName"])
        if not role.endswith("scheduler"):
            assert pod.get("volumes"), role
    assert claims == {pvc["metadata"]["name"]}


def test_readme_names_every_recipe():
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file() and p.name != "README.md"
                       and "__pycache__" not in p.parts):
        assert str(path.relative_to(DEPLOY)) in readme, path


# --------------------------------------------------------------------------- SLURM

def test_slurm_cpu_job_script(slurm_config, capsys):
    launcher = load_launcher()
    profile = yaml.safe_load(slurm_config.read_text())["profiles"]["cpu"]
    header, command = job_script(launcher, slurm_config, "cpu", capsys)
    for line in (f"#SBATCH -p {profile['queue']}", f"#SBATCH -t {profile['walltime']}",
                 f"#SBATCH -J {profile['job_name']}",
                 f"#SBATCH --cpus-per-task={profile['cores']}"):
        assert line in header.splitlines(), (line, header)
    assert re.search(r"^#SBATCH --mem=\d+G$", header, re.M)
    assert command[:3] == [sys.executable, "-m", "distributed.cli.dask_worker"]
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", command[3])
    # one thread per worker process, as many processes as cores
    assert profile["processes"] == profile["cores"]
    assert option(command, "--nthreads") == "1"
    assert option(command, "--nworkers") == str(profile["cores"])
    assert option(command, "--death-timeout") == str(profile["death_timeout"])


# `dask cuda worker` options (dask-cuda 26.10) the GPU job may use; dask-cuda itself is used
# instead when it is installed.
DASK_CUDA_WORKER_OPTIONS = {"--name", "--nthreads", "--memory-limit", "--death-timeout",
                            "--local-directory", "--interface", "--protocol", "--preload",
                            "--resources", "--tls-ca-file", "--tls-cert", "--tls-key"}


def test_slurm_gpu_job_script(slurm_config, capsys):
    launcher = load_launcher()
    profile = yaml.safe_load(slurm_config.read_text())["profiles"]["gpu"]
    header, command = job_script(launcher, slurm_config, "gpu", capsys)
    lines = header.splitlines()
    assert "#SBATCH --gres=gpu:1" in lines
    assert f"#SBATCH -p {profile['queue']}" in lines
    assert f"#SBATCH --cpus-per-task={profile['job_cpu']}" in lines
    # `python -m dask_cuda.cli` is `dask cuda worker` (one worker per visible GPU)
    assert command[:3] == [sys.executable, "-m", "dask_cuda.cli"]
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", command[3])
    assert option(command, "--nthreads") == "1"
    used = {t for t in command if t.startswith("--")}
    try:
        from dask_cuda.cli import worker
        accepted = {o for p in worker.params for o in p.opts if o.startswith("--")}
    except ImportError:  # dask-cuda needs CUDA libraries; the recorded option list instead
        accepted = DASK_CUDA_WORKER_OPTIONS
    assert used <= accepted, used - accepted


def test_slurm_scheduler_serves_the_refinement_page(slurm_config, monkeypatch):
    """The scheduler that dask-jobqueue starts with cluster.yaml's scheduler_options serves
    /dask-refine because of the preload (without it: not found)."""
    from distributed.dashboard.scheduler import applications

    launcher = load_launcher()
    config = launcher.load_config(slurm_config)
    assert config["scheduler_options"]["preload"] == [DASHBOARD_PRELOAD]
    # Forget the pages and the module, so that only the scheduler's preload can bring them back.
    for route in ("/dask-refine", "/individual-dask-refine"):
        monkeypatch.delitem(applications, route, raising=False)
    monkeypatch.delitem(sys.modules, DASHBOARD_PRELOAD, raising=False)
    import dask_refine.ui

    monkeypatch.delattr(dask_refine.ui, "dashboard", raising=False)

    def status(scheduler_options) -> int:
        with launcher.make_cluster(config, "cpu", scheduler_options) as cluster:
            assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
            url = cluster.dashboard_link.rsplit("/", 1)[0] + "/dask-refine"
            assert url.startswith("http://127.0.0.1:")
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

    assert status({"preload": []}) == 404
    assert "/dask-refine" not in applications
    assert status({}) == 200


def test_slurm_launcher_arguments(slurm_config):
    launcher = load_launcher()
    with pytest.raises(SystemExit):  # no command
        launcher.main(["--config", str(slurm_config)])
    with pytest.raises(SystemExit):  # the launcher supplies --scheduler
        launcher.main(["--config", str(slurm_config), "--", "refine", "s.zarr", "--initial",
                       "m.mrc", "--out", "o", "--scheduler", "tcp://elsewhere:8786"])
    with pytest.raises(SystemExit):  # unknown profile
        launcher.main(["--config", str(slurm_config), "--profile", "tpu", "--job-script"])


FAKE_SBATCH = """#!/bin/bash
# stand-in for sbatch: run the job script in the background, in a session of its own
n=$RANDOM; cp "$1" "{jobs}/job.$n.sh"
setsid bash "{jobs}/job.$n.sh" > "{jobs}/job.$n.log" 2>&1 < /dev/null &
echo "Submitted batch job $!"
"""
FAKE_SCANCEL = """#!/bin/bash
for j in "$@"; do kill -- -"$j" 2>/dev/null || kill "$j" 2>/dev/null; done
true
"""


@pytest.mark.slow
def test_slurm_launcher_runs_a_job_on_its_worker_jobs(slurm_config, tmp_path, monkeypatch,
                                                      capsys):
    """End to end with stand-ins for sbatch/scancel that run the job script here: the worker
    job joins the launcher's scheduler, `reconstruct` runs on it, the job is cancelled after."""
    from dask_refine.data import demo_map_path
    from dask_refine.ui.cli import main as dask_refine

    jobs = tmp_path / "jobs"
    (tmp_path / "bin").mkdir()
    jobs.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH.format(jobs=jobs)), ("scancel", FAKE_SCANCEL)):
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    config = yaml.safe_load(slurm_config.read_text())
    config["profiles"]["cpu"].update(cores=2, processes=2, memory="4GB")
    slurm_config.write_text(yaml.safe_dump(config))
    store, out = tmp_path / "p.zarr", tmp_path / "out"
    assert dask_refine(["simulate", str(demo_map_path()), str(store), "--write-poses",
                        "--n-particles", "200"]) == 0

    launcher = load_launcher()
    assert launcher.main(["--config", str(slurm_config), "--jobs", "1", "--", "reconstruct",
                          str(store), "--out", str(out), "--dashboard"]) == 0
    printed = capsys.readouterr()
    assert re.search(r"^http://127\.0\.0\.1:\d+/dask-refine$", printed.out, re.M), printed
    assert (out / "map.mrc").exists() and (out / "summary.json").exists()
    (log,) = jobs.glob("job.*.log")
    deadline = time.monotonic() + 30
    while "End worker" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = log.read_text()
    assert text.count("Registered to:") == 2, text  # both worker processes of the job joined
    assert "End worker" in text, text  # and were stopped when the command ended


def test_slurm_gpu_profile_runs_the_job_with_gpu(slurm_config):
    """Jobs launched on the GPU profile's dask-cuda workers compute on CuPy (``--gpu``); the
    CPU profile's do not."""
    launcher = load_launcher()
    config = launcher.load_config(slurm_config)
    assert launcher.gpu_profile(config, "gpu") and not launcher.gpu_profile(config, "cpu")
