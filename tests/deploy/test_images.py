"""The container images: architecture mapping, Dockerfile structure, and a replay of the
image build on this machine from exactly the files the build context lets in."""
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deploylib import REPO

TARGET_ARCH = REPO / "scripts" / "target-arch.sh"
BUILDX_ARCHES = ["amd64", "arm64", "arm", "riscv64"]


def make_var(makefile, name):
    match = re.search(rf"^{name}\s*:=\s*(.+)$", (REPO / makefile).read_text(), re.M)
    assert match, f"{makefile} defines no {name}"
    return match.group(1).split()


def target_arch(arch):
    return subprocess.run([str(TARGET_ARCH), arch], capture_output=True, text=True)


def instructions(path):
    """[(INSTRUCTION, arguments)] of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", Path(path).read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages(path):
    """{stage name: [(INSTRUCTION, arguments)]} in order; unnamed stages are numbered."""
    found, current = {}, None
    for word, rest in instructions(path):
        if word == "FROM":
            match = re.search(r"\bAS\s+(\S+)$", rest, re.I)
            current = match.group(1) if match else str(len(found))
            found[current] = [(word, rest)]
        elif current is not None:
            found[current].append((word, rest))
    return found


def test_buildx_arches_map_onto_the_bpf_arches():
    arches = make_var("Makefile", "ARCHES")
    assert sorted(arches) == sorted(make_var("bpf/Makefile", "SUPPORTED_ARCHES"))
    mapped = [target_arch(arch).stdout.strip() for arch in BUILDX_ARCHES]
    assert sorted(mapped) == sorted(arches)


def test_uname_names_map_like_the_makefiles():
    """scripts/target-arch.sh agrees with the Makefiles' `uname -m | sed ...` for every name."""
    sed = re.search(r"uname -m \| sed (.+?)\)$", (REPO / "bpf/Makefile").read_text(), re.S | re.M)
    expressions = re.findall(r"-e '([^']+)'", sed.group(1))
    for uname in ("x86_64", "aarch64", "armv7l", "armv6l", "riscv64"):
        by_make = subprocess.run(["sed", *[a for e in expressions for a in ("-e", e)]], input=uname,
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert target_arch(uname).stdout.strip() == by_make, uname


def test_unknown_arch_is_a_one_line_error():
    result = target_arch("s390x")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "s390x" in result.stderr


def test_dockerfile_stages():
    found = stages(REPO / "Dockerfile")
    assert list(found) == ["bpf", "wheel", "runtime"]
    args = dict(rest.split("=", 1) for word, rest in instructions(REPO / "Dockerfile") if word == "ARG" and "=" in rest)
    assert re.fullmatch(r"debian:\d+\.\d+-slim", args["DEBIAN_IMAGE"]), "pin the base image to a point release"
    assert all(rest.endswith(("${DEBIAN_IMAGE} AS " + name)) for name, ((_, rest), *_) in found.items())
    # the probe is compiled natively for TARGETARCH; the extensions on the target platform
    assert found["bpf"][0][1].startswith("--platform=$BUILDPLATFORM")
    bpf_runs = " ".join(rest for word, rest in found["bpf"] if word == "RUN")
    assert "scripts/target-arch.sh" in bpf_runs and "TARGETARCH" in bpf_runs and "make -C bpf TARGET_ARCH=" in bpf_runs
    assert "pip wheel --no-build-isolation" in " ".join(rest for word, rest in found["wheel"] if word == "RUN")
    runtime = dict((word, rest) for word, rest in found["runtime"] if word in ("ENTRYPOINT", "EXPOSE"))
    assert json.loads(runtime["ENTRYPOINT"]) == ["tcpmon"]
    assert runtime["EXPOSE"].split() == ["9090", "8080"]
    installs = " ".join(rest for word, rest in found["runtime"] if word == "RUN")
    assert re.search(r"apt-get install .*\blibbpf1\b", installs)
    assert not re.search(r"\b(clang|llvm|gcc|libbpf-dev|python3-dev)\b", installs), "build tools in the runtime stage"


def test_debug_image_adds_debugpy_on_5678():
    found = instructions(REPO / "Dockerfile.debug")
    words = dict(found)
    assert words["FROM"] == "${RELEASE_IMAGE}"
    assert re.search(r"debugpy==\d+\.\d+\.\d+", words["RUN"])
    assert words["EXPOSE"] == "5678"
    entry = json.loads(words["ENTRYPOINT"])
    assert entry[entry.index("--listen") + 1] == "0.0.0.0:5678" and entry[-2:] == ["-m", "tcpmon"]


def test_vscode_attach_configuration_matches_the_image():
    launch = json.loads((REPO / ".vscode/launch.json").read_text())
    attach = next(c for c in launch["configurations"] if c["name"] == "Attach to Kubernetes Pod")
    assert (attach["type"], attach["request"], attach["connect"]["port"]) == ("debugpy", "attach", 5678)
    (mapping,) = attach["pathMappings"]
    assert mapping["localRoot"] == "${workspaceFolder}/tcpmon"
    debian = re.search(r"DEBIAN_IMAGE=debian:(\d+)", (REPO / "Dockerfile").read_text()).group(1)
    python = {"12": "3.11", "13": "3.13"}[debian]  # each Debian release's python3
    assert mapping["remoteRoot"] == f"/opt/tcpmon/lib/python{python}/site-packages/tcpmon"
    tasks = json.loads((REPO / ".vscode/tasks.json").read_text())["tasks"]
    labels = {task["label"]: task for task in tasks}
    assert attach["preLaunchTask"] in labels
    for task in tasks:
        script = re.match(r"\$\{workspaceFolder\}/(\S+)", task["command"])
        if script:
            assert (REPO / script.group(1)).is_file(), task["command"]


def _ignored(rel, patterns):
    """Docker's .dockerignore rule: the last matching pattern wins; '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = [rel] + [str(Path(*Path(rel).parts[:i])) for i in range(1, len(Path(rel).parts))]
        globs = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if pattern.startswith("**/"):
            candidates += ["/".join(Path(rel).parts[i:]) for i in range(len(Path(rel).parts))]
        if any(fnmatch.fnmatchcase(c, g) for c in candidates for g in globs
               if g.count("/") == c.count("/") or g.startswith("**")):
            ignored = not negate
    return ignored


def build_context(dest):
    """Copies what `docker build .` would send (per .dockerignore) into dest."""
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    local = [str(p.relative_to(REPO)) for p in REPO.glob("tcpmon/**/*") if p.is_file()]
    sent = []
    for rel in sorted(set(tracked) | set(local)):
        if (REPO / rel).is_file() and not _ignored(rel, patterns):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
            sent.append(rel)
    return sent


def test_build_context_is_small_and_complete(tmp_path):
    sent = build_context(tmp_path)
    assert "setup.py" in sent and "bpf/tcpconnect.bpf.c" in sent and "ext/_maps.pyx" in sent
    assert not [rel for rel in sent if rel.startswith((".venv", "build/", "tests/", ".git/", "charts/"))]
    assert not [rel for rel in sent if rel.endswith((".so", ".bpf.o")) or "__pycache__" in rel]


def test_image_source_key_covers_the_build_context(tmp_path):
    """scripts/build-image.sh skips a build whose images carry its source key: the key must
    hash every file the build context sends, and only those."""
    listed = subprocess.run([str(REPO / "scripts/build-image.sh"), "--context-files"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert sorted(listed) == sorted(build_context(tmp_path))


def test_image_build_replayed_from_the_build_context(tmp_path):
    """The Dockerfile's bpf and wheel stages, run here for this machine's architecture on
    nothing but the files the build context holds."""
    context = tmp_path / "context"
    context.mkdir()
    build_context(context)
    wheel_stage = stages(REPO / "Dockerfile")["wheel"]
    src = tmp_path / "src"
    for word, rest in wheel_stage:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                path = context / source.rstrip("/")
                assert path.exists(), f"the wheel stage copies {source}, which the build context lacks"
                if path.is_dir():
                    shutil.copytree(path, src / source.rstrip("/"))
                else:
                    (src / source).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, src / source)
    # bpf stage: make -C bpf TARGET_ARCH="$(scripts/target-arch.sh "$TARGETARCH")" BUILD_DIR=/out
    arch = subprocess.run([str(context / "scripts/target-arch.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()
    out = tmp_path / "out"
    subprocess.run(["make", "-s", "-C", str(context / "bpf"), f"TARGET_ARCH={arch}", f"BUILD_DIR={out}"],
                   check=True, capture_output=True)
    (src / "tcpmon/data").mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / arch / "tcpconnect.bpf.o", src / "tcpmon/data/tcpconnect.bpf.o")
    # wheel stage: pip wheel --no-build-isolation --wheel-dir /wheels .
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                             "--wheel-dir", str(tmp_path / "wheels"), str(src)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("tcpmon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("_maps", "_render", "_libbpf"):
        assert any(re.fullmatch(rf"tcpmon/{module}\..*\.so", name) for name in names), module
    assert "tcpmon/data/tcpconnect.bpf.o" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tcpmon = tcpmon.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.parametrize("ignored, rel", [
    (True, ".venv/bin/python"), (True, "tcpmon/_maps.cpython-311-x86_64-linux-gnu.so"),
    (True, "ext/_maps.c"), (True, "tcpmon/data/tcpconnect.bpf.o"), (True, "tcpmon/__pycache__/cli.cpython-311.pyc"),
    (False, "tcpmon/cli.py"), (False, "ext/_maps.pyx"), (False, "bpf/tcpmon.h"), (False, "setup.py"),
])
def test_dockerignore_matcher(ignored, rel):
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert _ignored(rel, patterns) is ignored
