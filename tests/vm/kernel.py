#!/usr/bin/env python3
"""Build and cache the lockdep guest kernel that `tests/vm/run --kernel lockdep` boots.

The kernel is Debian's linux-source-6.1 (installed in the bookworm image), configured
as `make allnoconfig` plus tests/vm/lockdep.config, and built inside the bookworm image
root: the same compiler then builds the kernel and, later, the workload module against
it. It boots with the bookworm root. A kernel is a directory

    ${XDG_CACHE_HOME:-~/.cache}/tracer-exporter/kernels/lockdep-<hash>/
        vmlinuz, vmlinux       the kernel (vmlinux boots through PVH, faster under TCG)
        initrd.cpio.gz         the image's /init, no modules (9p and virtio are built in)
        modules/<release>/     what the guest sees as /lib/modules/<release>/: modules.*
                               from modules_install, and build/, the whole build tree
        config                 the resulting .config; info.json, build.log

where <hash> covers lockdep.config, the linux-source package version and BUILD_RECIPE.

CLI: kernel.py build [--force] | path | release
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import image  # noqa: E402  (lives beside this script)

KERNELS = ("lockdep",)
BASE_DISTRO = "bookworm"  # its root runs the lockdep kernel, and builds it
SOURCE_PACKAGE = "linux-source-6.1"
CONFIG_FRAGMENT = HERE / "lockdep.config"
# Bump when the build steps below change what is built (the fragment and the source
# version are hashed by themselves).
BUILD_RECIPE = "1"

# Runs in a private mount namespace: $1 image root, $2 work dir, $3 mount point, $4 jobs.
# The image root is read-only; the work dir is bound at /vm (an empty directory there).
BUILD_SCRIPT = r"""
set -e
root=$1 work=$2 top=$3 jobs=$4
mount --make-rprivate /
mount --bind -o ro "$root" "$top"
mount --bind "$work" "$top/vm"
mount -t tmpfs -o mode=1777 tmpfs "$top/tmp"
mount -t proc proc "$top/proc"
exec chroot "$top" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp LANG=C.UTF-8 JOBS="$jobs" SOURCE=/usr/src/linux-source-6.1.tar.xz /bin/sh -ec '
cd /vm
tar -xf "$SOURCE"
cd linux-source-6.1
# allnoconfig turns everything off, then takes the fragment: only what we ask for.
make -s ARCH=x86_64 KCONFIG_ALLCONFIG=/vm/lockdep.config allnoconfig
cp .config /vm/config
make -s ARCH=x86_64 -j"$JOBS"
make -s ARCH=x86_64 INSTALL_MOD_PATH=/vm/staging modules_install
make -s ARCH=x86_64 kernelrelease >/vm/release
'
"""


def log(msg: str) -> None:
    print(f"kernel: {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return image.cache_root().parent / "kernels"


def source_version(root: Path) -> str:
    """The version of linux-source-6.1 in the image root, from dpkg's status file."""
    package = None
    for line in (root / "var/lib/dpkg/status").read_text().splitlines():
        if line.startswith("Package: "):
            package = line.split(None, 1)[1]
        elif line.startswith("Version: ") and package == SOURCE_PACKAGE:
            return line.split(None, 1)[1]
    raise SystemExit(f"kernel: {SOURCE_PACKAGE} is not installed in the {BASE_DISTRO} image ({root})")


def config_lines() -> list[str]:
    """The fragment's settings, without comments and blank lines."""
    lines = [ln.strip() for ln in CONFIG_FRAGMENT.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def kernel_hash(version: str) -> str:
    h = hashlib.sha256()
    for part in (CONFIG_FRAGMENT.read_bytes(), version.encode(), BUILD_RECIPE.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def kernel_path(name: str = "lockdep") -> Path:
    root = image.image_path(BASE_DISTRO) / "root"
    if not root.is_dir():
        root = image.get(BASE_DISTRO) / "root"
    return cache_root() / f"{name}-{kernel_hash(source_version(root))}"


def unmet_settings(config_text: str, wanted: list[str]) -> list[str]:
    """Fragment lines that the final .config does not have (a dependency turned them off)."""
    have = set(config_text.splitlines())
    out = []
    for line in wanted:
        if line.endswith("=n"):
            line = f"# {line[:-2]} is not set"
        if line not in have:
            out.append(line)
    return out


def _build_into(work: Path, build_log: Path, root: Path) -> dict[str, object]:
    shutil.copyfile(CONFIG_FRAGMENT, work / "lockdep.config")
    jobs = str(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="tracer-kernel-") as top, open(build_log, "a") as logf:
        argv = ["unshare", "--mount", "sh", "-c", BUILD_SCRIPT, "sh", str(root), str(work), top, jobs]
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        tail = build_log.read_text(errors="replace").splitlines()[-40:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise SystemExit(f"kernel: the build failed (exit {res.returncode}); log: {build_log}")
    unmet = unmet_settings((work / "config").read_text(), config_lines())
    if unmet:
        raise SystemExit(f"kernel: {CONFIG_FRAGMENT.name} asks for settings the .config lacks: {', '.join(unmet)}")
    release = (work / "release").read_text().strip()
    tree = work / "linux-source-6.1"
    moddir = work / "staging" / "lib" / "modules" / release
    # modules_install links build/ and source/ to the tree: put the tree itself there,
    # so one read-only share gives the guest /lib/modules/<release>/build.
    for link in ("build", "source"):
        (moddir / link).unlink(missing_ok=True)
    os.rename(tree, moddir / "build")
    os.rename(work / "staging" / "lib" / "modules", work / "modules")
    shutil.rmtree(work / "staging")
    tree = work / "modules" / release / "build"
    shutil.copyfile(tree / "arch/x86/boot/bzImage", work / "vmlinuz")
    if image._has_pvh_note((tree / "vmlinux").read_bytes()):
        shutil.copyfile(tree / "vmlinux", work / "vmlinux")
    image.build_initramfs(None, work / "initrd.cpio.gz")
    return {"release": release}


def build(name: str = "lockdep", force: bool = False) -> Path:
    """Build the kernel unless the cache has it; return its directory."""
    if name not in KERNELS:
        raise SystemExit(f"kernel: unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    root = image.get(BASE_DISTRO) / "root"
    version = source_version(root)
    final = cache_root() / f"{name}-{kernel_hash(version)}"
    if image.is_built(final) and not force:
        return final
    if os.geteuid() != 0:
        raise SystemExit("kernel: building the kernel needs root (mount, chroot)")
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{name}.lock", "w") as lockf:
        try:
            fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another build of the {name} kernel is running; waiting for it")
            fcntl.flock(lockf, fcntl.LOCK_EX)
        if image.is_built(final) and not force:
            return final
        for stale in image.cached_versions(cache, name, building=True):
            image.safe_rmtree(stale)
        work = cache / f"{final.name}.tmp{os.getpid()}"
        work.mkdir()
        build_log = work / "build.log"
        log(f"building the {name} kernel from {SOURCE_PACKAGE} {version} (log: {build_log})")
        started = time.monotonic()
        try:
            info = _build_into(work, build_log, root)
        except BaseException:
            shutil.copyfile(build_log, cache / f"{name}-failed-build.log")
            log(f"build log kept at {cache / f'{name}-failed-build.log'}")
            image.safe_rmtree(work)
            raise
        info.update(
            kernel=name,
            source_package=f"{SOURCE_PACKAGE} {version}",
            base_distro=BASE_DISTRO,
            build_seconds=round(time.monotonic() - started, 1),
            built=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        (work / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if final.exists():
            image.safe_rmtree(final)
        os.rename(work, final)
        for old in image.cached_versions(cache, name):
            if old != final and old.is_dir() and not image._in_use(old):
                image.safe_rmtree(old)
        log(f"built the {name} kernel {info['release']} in {info['build_seconds']} s: {final}")
        return final


def get(name: str = "lockdep") -> Path:
    """The kernel directory, built on first use."""
    return build(name)


def release_of(kdir: Path) -> str:
    return str(image.load_info(kdir)["release"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="build the kernel unless cached")
    p_build.add_argument("--force", action="store_true", help="rebuild even if cached")
    sub.add_parser("path", help="print the kernel directory (built or not)")
    sub.add_parser("release", help="print the kernel release (builds it first if needed)")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        print(build(force=args.force))
    elif args.cmd == "path":
        print(kernel_path())
    else:
        print(release_of(get()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
