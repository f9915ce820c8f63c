"""The engine does not fill up: docker-engine.sh's ``prune_images`` on a real Docker engine.

Every rebuild of a tag leaves the image it replaced dangling, and every ``skaffold dev``
iteration tags new images; ``prune_images`` (after each image build) and ``prune_images
--dev`` (after ``dev.sh delete``) remove them. The images here are tiny imports into
repositories of this test's own (CQRS_IMAGE_REPOS), so the real images are never touched.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tomllib
import uuid

from .conftest import ENGINE_SCRIPT, ROOT, Docker

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _import(docker: Docker, reference: str, title: str, content: str) -> str:
    """A one-file image named ``reference`` with our title label; its image ID."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        data = content.encode()
        info = tarfile.TarInfo("marker")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    done = subprocess.run(
        [
            docker.env.get("DOCKER", "docker"),
            "import",
            "--change",
            f"LABEL org.opencontainers.image.title={title}",
            "--change",
            'CMD ["/marker"]',
            "-",
            reference,
        ],
        input=archive.getvalue(),
        env=docker.env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    return done.stdout.decode().strip()


def _exists(docker: Docker, reference: str) -> bool:
    return docker.run("image", "inspect", reference, check=False).returncode == 0


def _container(docker: Docker, name: str) -> bool:
    return docker.run("container", "inspect", name, check=False).returncode == 0


def _prune(
    docker: Docker, repo: str, *args: str, after: str | None = "0s", base: str | None = None
) -> None:
    """prune_images ARGS in ``repo``; ``after``: CQRS_PRUNE_AFTER (None: its default);
    ``base``: the image build steps descend from (BASE_IMAGE)."""
    env = {**docker.env, "CQRS_IMAGE_REPOS": repo}
    if base is not None:
        env["BASE_IMAGE"] = base
    if after is not None:
        env["CQRS_PRUNE_AFTER"] = after
    done = subprocess.run(
        ["bash", "-c", f'source "{ENGINE_SCRIPT}"; prune_images "$@"', "prune", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_prune_keeps_the_release_tags_and_removes_the_dev_loops_images(docker: Docker) -> None:
    repo = f"cqrs-prune-test-{uuid.uuid4().hex[:8]}"
    release = f"{repo}:{VERSION}"
    previous = f"{repo}:{VERSION}-60f5b61"
    skaffold_tags = [
        f"{repo}:{'ab' * 32}",
        f"{repo}:7f69011-dirty",
        f"{repo}:v0.1.0-3-g7f69011-dirty",
        f"{repo}:latest",
    ]
    # Not the dev loop's: a previous release of another version, another version, a user's.
    others = [f"{repo}:0.0.9-60f5b61", f"{repo}:9.9.9", f"{repo}:my-experiment"]
    in_use = f"{repo}:cd9d0c3"
    container = f"prune-test-{uuid.uuid4().hex[:8]}"
    # The release tag rebuilt: its first image is left dangling.
    replaced = _import(docker, release, repo, "first build")
    _import(docker, release, repo, "second build")
    _import(docker, previous, repo, "previous release")
    for n, tag in enumerate(skaffold_tags):
        _import(docker, tag, repo, f"dev iteration {n}")
    for n, tag in enumerate(others):
        _import(docker, tag, repo, f"kept {n}")
    _import(docker, in_use, repo, "a container runs this one")
    docker.run("create", "--name", container, in_use)
    # A build step's container as `skaffold dev` leaves it (BASE_IMAGE: the step's ancestor).
    step = f"prune-test-step-{uuid.uuid4().hex[:8]}"
    docker.run("create", "--name", step, in_use, "/bin/sh", "-c", "pip install -r x.txt")
    try:
        assert _exists(docker, replaced)
        # Dangling for seconds only: it may be the newest step of a build that takes no
        # image lock (skaffold's own in `make dev`), so the default age filter keeps it.
        _prune(docker, repo, after=None)
        assert _exists(docker, replaced)
        _prune(docker, repo)
        # After a build: the dangling one goes, every tag stays.
        assert not _exists(docker, replaced)
        for reference in (release, previous, in_use, *skaffold_tags, *others):
            assert _exists(docker, reference), reference

        assert _container(docker, step)
        _prune(docker, repo, "--dev", base=in_use)
        assert not _container(docker, step)
        assert _container(docker, container)  # its command is the image's own: not a step
        for reference in (release, previous, *others):
            assert _exists(docker, reference), reference
        # A container still uses it: kept.
        assert _exists(docker, in_use)
        for reference in skaffold_tags:
            assert not _exists(docker, reference), reference
    finally:
        docker.run("rm", "-f", container, step, check=False)
        for reference in (release, previous, in_use, *skaffold_tags, *others):
            docker.run("rmi", "-f", reference, check=False)
