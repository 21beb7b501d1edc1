"""Derived kernel images (issue 14, section 1): packages resolved on the host, locked by hash, installed
offline, tagged by content, listed and removed; from Python, a profile and the CLI.

The engine tests use wheels made here (a wheel is a zip: no network, no build backend) and reach them
through ``--find-links`` with ``--no-index`` (or the host pip's PIP_FIND_LINKS/PIP_NO_INDEX): nothing
needs the internet. Each test removes the images it built.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

from kernelexec import Policy, Session
from kernelexec.errors import ImageBuildError, RestoreError
from kernelexec.profiles import PolicyViolation, profile_policy, within
from kernelexec.tools.packages import (
    LABEL_LOCK,
    build_packages,
    check_requirement,
    derived_tag,
    image_lock,
    list_images,
    read_requirements,
    remove_image,
    render_lock,
    request_digest,
    requirement_name,
)

# ------------------------------------------------------------------------------------------- helpers


def make_wheel(directory: Path, name: str, version: str, requires: tuple[str, ...] = (),
               files: dict[str, str] | None = None) -> Path:
    """A pure-Python wheel of ``name``, with a module that says its version (``VALUE``)."""
    module = name.replace("-", "_")
    files = files if files is not None else {f"{module}/__init__.py": f"VALUE = {version!r}\n"}
    info = f"{module}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    entries[f"{info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: kernelexec-tests\nRoot-Is-Purelib: true\n"
                                "Tag: py3-none-any\n")
    record = []
    for path, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    entries[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in entries.items():
            z.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), text)
    return wheel


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- pure logic, no engine


@pytest.mark.parametrize("spec", ["seaborn", "scikit-learn>=1.4,<2", "pandas[excel, perf]==2.2.3", "a.b_c~=1.0",
                                  "tomli; python_version < '3.11'"])
def test_requirements_that_an_index_can_resolve_are_accepted(spec):
    assert check_requirement(spec) == spec.strip()


@pytest.mark.parametrize("spec,why", [
    ("", "empty"), ("-r other.txt", "pip option"), ("--index-url=http://evil", "pip option"),
    ("pkg @ https://example.org/pkg.whl", "URL or a path"), ("./local/dir", "URL or a path"),
    ("two words", "not a requirement"), ("pkg==", "not a requirement"), ("pkg>=1 extra", "not a requirement"),
])
def test_anything_else_is_refused_saying_why(spec, why):
    with pytest.raises(ValueError, match=why):
        check_requirement(spec)


def test_request_digest_ignores_order_and_spelling_but_not_the_base_or_versions():
    a = request_digest("sha256:base1", ["Scikit_Learn >= 1.4", "seaborn"])
    assert a == request_digest("sha256:base1", ["seaborn", "scikit-learn>=1.4"])
    assert a != request_digest("sha256:base2", ["seaborn", "scikit-learn>=1.4"])
    assert a != request_digest("sha256:base1", ["seaborn", "scikit-learn>=1.5"])
    lock = "b==1 --hash=sha256:" + "1" * 64 + "\na==2 --hash=sha256:" + "2" * 64 + "\n"
    reordered = "a==2 \\\n    --hash=sha256:" + "2" * 64 + "\nb==1 --hash=sha256:" + "1" * 64 + "\n"
    assert request_digest("sha256:base1", [], lock) == request_digest("sha256:base1", [], reordered)
    assert request_digest("sha256:base1", [], lock) != a
    assert requirement_name("Scikit_Learn>=1") == "scikit-learn"


def test_tag_is_the_base_and_the_lock_digest():
    lock = render_lock({"b": ("1.0", {"1" * 64}), "a": ("2.0", ["2" * 64])})
    assert lock == f"a==2.0 --hash=sha256:{'2' * 64}\nb==1.0 --hash=sha256:{'1' * 64}\n"
    digest = hashlib.sha256(lock.encode()).hexdigest()[:12]
    assert derived_tag("kernelexec-kernel:23d93df4ceb5", "sha256:" + "f" * 64, lock) == \
        f"kernelexec-kernel:23d93df4ceb5-{digest}"
    # any other base is named by its image id (content), not its name
    assert derived_tag("myorg/kernel:latest", "sha256:abcdef0123456789" + "0" * 48, lock) == \
        f"kernelexec-kernel:abcdef012345-{digest}"
    other = render_lock({"b": ("1.0", {"1" * 64}), "a": ("2.1", ["2" * 64])})
    assert derived_tag("kernelexec-kernel:23d93df4ceb5", "x", other) != derived_tag(
        "kernelexec-kernel:23d93df4ceb5", "x", lock)


def test_requirements_files_and_locks_are_told_apart(tmp_path):
    plain = tmp_path / "requirements.txt"
    plain.write_text("# team packages\nseaborn\n\nscikit-learn>=1.4  # for the models\n")
    assert read_requirements(plain) == (["seaborn", "scikit-learn>=1.4"], None)
    lock = tmp_path / "lock.txt"
    lock.write_text(f"seaborn==0.13.2 \\\n    --hash=sha256:{'a' * 64}\n")
    assert read_requirements(lock) == ([], lock.read_text())
    half = tmp_path / "half.txt"
    half.write_text(f"seaborn==0.13.2 --hash=sha256:{'a' * 64}\nscipy\n")
    with pytest.raises(ImageBuildError, match="scipy"):
        read_requirements(half)
    bad = tmp_path / "bad.txt"
    bad.write_text("seaborn\n--extra-index-url http://x\n")
    with pytest.raises(ImageBuildError, match="line 2"):
        read_requirements(bad)


def test_policy_packages_are_validated_and_kept_as_a_tuple():
    p = Policy(packages=["seaborn", "scipy>=1.10"], image_flavour="analysis")  # type: ignore[arg-type]
    assert p.packages == ("seaborn", "scipy>=1.10")
    with pytest.raises(ValueError, match="Policy.packages"):
        Policy(packages=("seaborn", "-e ."))
    with pytest.raises(ValueError, match="not a string"):
        Policy(packages="seaborn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="known: \\['analysis'\\]"):
        Policy(image_flavour="everything")
    assert json.loads(p.to_json())["packages"] == ["seaborn", "scipy>=1.10"]


def test_profile_packages_come_from_the_file_and_a_session_adds_to_them(tmp_path):
    toml = tmp_path / "kernelexec.toml"
    toml.write_text('[profiles.team]\nextends = "analyst"\npackages = ["seaborn", "openpyxl"]\n'
                    'image_flavour = "analysis"\n')
    team = profile_policy("team", toml)
    assert team.packages == ("seaborn", "openpyxl") and team.image_flavour == "analysis"
    merged = within(Policy(packages=("statsmodels", "seaborn")), team, role="team")
    assert merged.packages == ("seaborn", "openpyxl", "statsmodels")
    assert merged.image_flavour == "analysis" and merged.memory == team.memory
    assert within(Policy(memory="1g"), team, role="team").packages == team.packages
    with pytest.raises(PolicyViolation):  # packages are not a way around the profile's other bounds
        within(Policy(packages=("x",), memory="8g"), team, role="team")


def test_a_backend_that_cannot_build_images_says_so():
    from kernelexec.backend.local import LocalBackend

    with pytest.raises(NotImplementedError, match="cannot add packages"):
        asyncio.run(LocalBackend().image_with("img", ("seaborn",), None))


# ------------------------------------------------------------------------------------ on a real engine


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    """A --find-links directory of small wheels; the wheelhouse and the build locks under tmp_path."""
    links = tmp_path / "links"
    links.mkdir()
    make_wheel(links, "kx-tiny-b", "1.0")
    make_wheel(links, "kx-tiny-a", "2.0", requires=("kx-tiny-b>=1",))
    make_wheel(links, "kx-tiny-c", "3.0")
    make_wheel(links, "kx-numpy-user", "1.0", requires=("numpy<1",))  # the base has numpy 2: a conflict
    make_wheel(links, "numpy", "0.5")  # which an unconstrained resolution would happily install over it
    monkeypatch.setenv("KERNELEXEC_WHEELHOUSE", str(tmp_path / "wheelhouse"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return links


@pytest.fixture
def built(docker):
    """Tags to remove at the end of the test (and nothing the test did not build)."""
    tags: list[str] = []
    yield tags
    for tag in reversed(tags):
        try:
            docker.images.remove(tag)
        except Exception as e:  # the image may be gone already: the test removed it
            if "No such image" not in str(e):
                raise


def our_tmp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("kernelexec-*")
            if p.name.startswith(("kernelexec-resolve-", "kernelexec-wheels-", "kernelexec-derive-"))}


def images_on(docker, base: str) -> set[str]:
    """Every image (intermediate ones too) that stands on ``base``'s layers: what a build on it left."""
    layers = docker.images.get(base).attrs["RootFS"]["Layers"]
    base_id = docker.images.get(base).id
    found = set()
    for img in docker.api.images(all=True):
        if img["Id"] == base_id:
            continue
        mine = docker.api.inspect_image(img["Id"])["RootFS"].get("Layers", [])
        if mine[: len(layers)] == layers:
            found.add(img["Id"])
    return found


def test_with_builds_offline_locks_by_hash_and_is_skipped_when_unchanged(docker, kernel_image, index, built):
    lines: list[str] = []
    tag = build_packages(["kx-tiny-a"], base=kernel_image, find_links=[index], no_index=True,
                         progress=lines.append)
    built.append(tag)
    log = "\n".join(lines)
    assert "installing from the wheelhouse in the build context (no index)" in log
    # the lock: the package and its dependency, each by the hash of the wheel that was installed
    lock = image_lock(tag)
    a, b = index / "kx_tiny_a-2.0-py3-none-any.whl", index / "kx_tiny_b-1.0-py3-none-any.whl"
    assert lock == f"kx-tiny-a==2.0 --hash=sha256:{sha(a)}\nkx-tiny-b==1.0 --hash=sha256:{sha(b)}\n"
    assert "numpy" not in lock  # the base's packages are the base's
    assert tag == derived_tag(kernel_image, docker.images.get(kernel_image).id, lock)
    assert docker.images.get(tag).labels[LABEL_LOCK] == lock
    # the wheels stay in the wheelhouse: a rebuild needs no index
    assert sorted(p.name for p in Path(os.environ["KERNELEXEC_WHEELHOUSE"]).glob("*.whl")) == [a.name, b.name]
    # the package works in the image, next to the base's
    out = docker.containers.run(tag, ["/opt/kernel/bin/python", "-c",
                                      "import kx_tiny_a, kx_tiny_b, numpy; print(kx_tiny_a.VALUE, kx_tiny_b.VALUE)"],
                                remove=True, network_mode="none")
    assert out.decode().strip() == "2.0 1.0"
    # the same request again: found by its label, no resolution, no build
    image_id = docker.images.get(tag).id
    again: list[str] = []
    assert build_packages(["KX_Tiny_A"], base=kernel_image, find_links=[index], no_index=True,
                          progress=again.append) == tag
    assert any("up to date" in line for line in again) and not any("$ " in line for line in again), again
    assert docker.images.get(tag).id == image_id
    # the same lock given back: the same content, the same tag
    assert build_packages(lock=lock, base=kernel_image, find_links=[index], no_index=True) == tag


def test_a_name_the_index_does_not_have_is_named_and_nothing_is_left(docker, kernel_image, index, built):
    before_images, before_tmp = images_on(docker, kernel_image), our_tmp_dirs()
    with pytest.raises(ImageBuildError) as failure:
        build_packages(["kx-tiny-c", "kx-no-such-package"], base=kernel_image, find_links=[index], no_index=True)
    first = str(failure.value).splitlines()[0]
    assert "pip could not get kx-no-such-package" in first, str(failure.value)
    assert images_on(docker, kernel_image) <= before_images
    assert our_tmp_dirs() <= before_tmp
    assert not list(Path(os.environ["KERNELEXEC_WHEELHOUSE"]).glob("*.whl"))  # kx-tiny-c was not kept either


def test_a_conflict_with_the_base_packages_is_refused_not_installed(docker, kernel_image, index):
    with pytest.raises(ImageBuildError) as failure:
        build_packages(["kx-numpy-user"], base=kernel_image, find_links=[index], no_index=True)
    message = str(failure.value)
    first = message.splitlines()[0]
    assert "kx-numpy-user 1.0 depends on numpy<1" in first and "the base image has numpy==" in first, message


def test_a_hash_mismatch_or_a_missing_wheel_names_the_package(docker, kernel_image, index, built):
    good = index / "kx_tiny_c-3.0-py3-none-any.whl"
    before_images, before_tmp = images_on(docker, kernel_image), our_tmp_dirs()
    # the wheelhouse has a file of that name and version, but not the locked bytes: it must not be used
    wheelhouse = Path(os.environ["KERNELEXEC_WHEELHOUSE"])
    wheelhouse.mkdir()
    shutil.copy(good, wheelhouse)
    wrong = f"kx-tiny-c==3.0 --hash=sha256:{'0' * 64}\n"
    with pytest.raises(ImageBuildError) as failure:
        build_packages(lock=wrong, base=kernel_image, find_links=[index], no_index=True)
    assert "no wheel matching the lock for kx-tiny-c" in str(failure.value).splitlines()[0]
    absent = f"kx-tiny-c==3.0 --hash=sha256:{sha(good)}\nkx-not-in-the-wheelhouse==1.0 --hash=sha256:{'1' * 64}\n"
    with pytest.raises(ImageBuildError) as failure:
        build_packages(lock=absent, base=kernel_image, find_links=[index], no_index=True)
    assert "kx-not-in-the-wheelhouse" in str(failure.value).splitlines()[0]
    assert images_on(docker, kernel_image) <= before_images
    assert our_tmp_dirs() <= before_tmp


def test_a_package_that_fails_in_the_build_is_named_and_its_layers_removed(docker, kernel_image, index, built):
    """An incomplete lock (kx-tiny-a without the kx-tiny-b it requires) gets past the host and fails the
    build's `pip check`: the error names it, and no image of the build stays."""
    before = images_on(docker, kernel_image)
    a = index / "kx_tiny_a-2.0-py3-none-any.whl"
    lines: list[str] = []
    with pytest.raises(ImageBuildError) as failure:
        build_packages(lock=f"kx-tiny-a==2.0 --hash=sha256:{sha(a)}\n", base=kernel_image, find_links=[index],
                       no_index=True, progress=lines.append)
    message = str(failure.value)
    assert "installing kx-tiny-a==2.0" in message.splitlines()[0]
    assert "kx-tiny-a 2.0 requires kx-tiny-b, which is not installed" in message
    assert any("Step " in line for line in lines)  # it did fail in the build, not before it
    assert images_on(docker, kernel_image) <= before
    assert not [i for i in list_images() if "kx-tiny-a==2.0" in i.packages]


def test_ls_shows_what_each_adds_and_rm_refuses_an_image_in_use(docker, kernel_image, index, built):
    tag = build_packages(["kx-tiny-c"], base=kernel_image, find_links=[index], no_index=True)
    built.append(tag)
    listed = {i.tag: i for i in list_images()}
    assert listed[tag].packages == ("kx-tiny-c==3.0",) and listed[tag].base == kernel_image
    assert listed[tag].requested == ("kx-tiny-c",)
    assert kernel_image in listed and listed[kernel_image].packages == () and listed[kernel_image].base is None
    # a session asking for the same package runs that image (found, not rebuilt: no index needed)
    with Session(Policy(image=kernel_image, packages=("kx-tiny-c",))) as s:
        assert s.execute("import kx_tiny_c; print(kx_tiny_c.VALUE)").stdout == "3.0\n"
        assert docker.api.inspect_container(s.container_id)["Config"]["Image"] == tag
        with pytest.raises(ImageBuildError, match="used by 1 session container"):
            remove_image(tag)
        assert docker.images.get(tag)
    remove_image(tag)
    assert tag not in {i.tag for i in list_images()}
    with pytest.raises(ImageBuildError, match="no image"):
        remove_image(tag)


def test_a_profile_states_packages_once_and_concurrent_first_uses_build_once(docker, kernel_image, index, built,
                                                                          tmp_path, monkeypatch):
    """The role's packages come from kernelexec.toml; the first sessions build the image (the host pip's own
    configuration, here PIP_FIND_LINKS/PIP_NO_INDEX), together, once."""
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    toml = tmp_path / "kernelexec.toml"
    toml.write_text(f'[profiles.team]\nimage = "{kernel_image}"\npackages = ["kx-tiny-a"]\n')
    lines: list[str] = []
    results: list[object] = []

    def first_use() -> None:
        try:
            results.append(build_packages(["kx-tiny-a"], base=kernel_image, progress=lines.append))
        except Exception as e:  # reported by the assertion below
            results.append(e)

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1] and isinstance(results[0], str), results
    built.append(results[0])
    assert sum(line.startswith("building ") for line in lines) == 1, lines
    with Session(profile="team", profiles_file=toml) as s:
        assert s.execute("import kx_tiny_a, kx_tiny_b; print(kx_tiny_a.VALUE)").stdout == "2.0\n"
        assert docker.api.inspect_container(s.container_id)["Config"]["Image"] == results[0]


def test_cli_build_ls_lock_and_rm(docker, kernel_image, index, built, capsys, tmp_path):
    from kernelexec.tools.cli import main

    args = ["image", "build", "--base", kernel_image, "--with", "kx-tiny-c", "--find-links", str(index), "--no-index"]
    assert main(args) == 0
    tag = capsys.readouterr().out.strip().splitlines()[-1]
    built.append(tag)
    assert tag.startswith(kernel_image + "-")
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["image", "ls"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(tag + " "))
    assert "kx-tiny-c==3.0" in row and kernel_image in row
    assert main(["image", "lock", tag]) == 0
    lock = tmp_path / "team.lock"
    lock.write_text(capsys.readouterr().out)
    assert main(["image", "build", "--base", kernel_image, "--requirements", str(lock), "--no-index",
                 "--find-links", str(index)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == tag  # the lock names the same image
    assert main(["image", "build", "--with", "-e .", "--base", kernel_image]) == 2
    assert "pip option" in capsys.readouterr().err
    assert main(["image", "rm", tag]) == 0
    assert f"removed {tag}" in capsys.readouterr().out
    assert main(["image", "rm", tag]) == 2
    assert "no image" in capsys.readouterr().err


ANALYSIS = """
import numpy as np, pandas as pd, scipy.stats, sklearn.linear_model, seaborn, statsmodels.api as sm, openpyxl
import pyarrow as pa, pyarrow.parquet as pq
x = np.arange(50.0); y = 3 * x + 2
fit = sklearn.linear_model.LinearRegression().fit(x[:, None], y)
ols = sm.OLS(y, sm.add_constant(x)).fit()
pq.write_table(pa.table({"x": x}), "/work/x.parquet")
pd.DataFrame({"x": x}).to_excel("/work/x.xlsx")
ax = seaborn.lineplot(x=x, y=y)
print(round(fit.coef_[0], 6), round(ols.params[1], 6), round(scipy.stats.pearsonr(x, y)[0], 6),
      len(pq.read_table("/work/x.parquet")), len(pd.read_excel("/work/x.xlsx")))
"""


def test_the_analysis_flavour_has_the_usual_imports_of_a_data_analysis_agent(docker, kernel_image, built):
    """One flag (Policy.image_flavour): the flavour is built from the host's index on first use (a
    minute; its wheels cached in the wheelhouse), and an analysis agent's usual imports work."""
    from kernelexec import Policy, Session

    with Session(Policy(image=kernel_image, image_flavour="analysis")) as s:
        r = s.execute(ANALYSIS)
        tag = docker.api.inspect_container(s.container_id)["Config"]["Image"]
    built.append(tag)
    assert r.error is None, r.error
    assert r.stdout.split() == ["3.0", "3.0", "1.0", "50", "50"], r.stdout
    assert tag.startswith(kernel_image + "-")  # a derived image of this base, tagged by its lock


def test_a_snapshot_restores_into_an_image_with_its_packages_and_names_them_where_missing(docker, kernel_image,
                                                                                          index, built):
    """Issue 16: a restore into another image works when the packages exist and names the module otherwise."""
    tag = build_packages(["kx-tiny-c"], base=kernel_image, find_links=[index], no_index=True)
    built.append(tag)
    with Session(Policy(image=tag)) as s:
        s.execute("import kx_tiny_c as tiny; from kx_tiny_c import VALUE; kept = [VALUE, tiny.VALUE]")
        snap = s.snapshot()
    assert snap.modules == {"tiny": "kx_tiny_c"} and snap.image == tag
    with pytest.raises(RestoreError, match="kx_tiny_c") as e:
        Session.restore(snap, Policy(image=kernel_image))
    assert e.value.missing == ("kx_tiny_c",)
    with Session.restore(snap, Policy(image=tag)) as r:
        assert r.execute("print(kept, tiny.VALUE, VALUE)").stdout.strip() == "['3.0', '3.0'] 3.0 3.0"
