#!/usr/bin/env python3
"""Build and cache the Debian guest images that tests/vm/run boots.

An image is a directory: root/ (a minbase Debian made by mmdebstrap, with BCC, the kernel and its
headers), vmlinuz (plus vmlinux, the same kernel uncompressed, when it can boot through
PVH), initrd.cpio.gz (busybox + the few modules needed to mount 9p) and info.json.
It lives in ${XDG_CACHE_HOME:-~/.cache}/tracer-exporter/images/<distro>-<hash>/, where
<hash> covers the recipe's data (the distro's entry, the package lists, /init) and
RECIPE, so changing the recipe rebuilds by itself and editing a comment does not.

CLI: image.py build [--distro D] [--force] | path [--distro D] | ensure
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Distro:
    suite: str  # the release the image is
    kernel_suite: str  # where the kernel and headers come from (security has the newest kernel)
    extra_suites: tuple[str, ...] = ()  # more suites on the main mirror, e.g. backports
    packages: tuple[str, ...] = ()  # more packages for this distro only
    kernel_packages: tuple[str, ...] = ()  # installed with the kernel, from kernel_suite


# Builds the lockdep kernel (tests/vm/kernel.py) inside the bookworm root, so that
# the kernel and the workload module built against it use the same compiler.
KERNEL_BUILD_PACKAGES = ("linux-source-6.1", "bc", "bison", "flex", "libelf-dev")

# One entry per bootable guest; a new distro is one more line.
DISTROS: dict[str, Distro] = {
    # 5.10, bcc 0.18, Python 3.9: the oldest kernel and userland we support.
    "bullseye": Distro(suite="bullseye", kernel_suite="bullseye-security"),
    "bookworm": Distro(suite="bookworm", kernel_suite="bookworm-security", packages=KERNEL_BUILD_PACKAGES),
    "trixie": Distro(suite="trixie", kernel_suite="trixie-security"),
    # The newest Debian kernel (7.x) with trixie's userland. initramfs-tools: its
    # update-initramfs is diverted to true below; without it apt picks dracut for the
    # 7.x kernel, which then tries to build an initramfs in the chroot, and fails.
    "trixie-backports": Distro(
        suite="trixie",
        kernel_suite="trixie-backports",
        extra_suites=("trixie-backports",),
        kernel_packages=("initramfs-tools",),
    ),
}
DEFAULT_DISTRO = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Every list below goes into one mmdebstrap run (one apt resolution and unpack), with
# the release, security and any extra suites as sources: the kernel and its headers
# are then the same, newest, build.
BASE_PACKAGES = (
    "python3-bpfcc",
    "python3-yaml",
    "python3-prometheus-client",
    "python3-pytest",
    "gcc",
    "make",
    "libc6-dev",
    "kmod",
    "iproute2",
    "procps",
    "util-linux",
    "xz-utils",
)
KERNEL_PACKAGES = ("linux-image-amd64", "linux-headers-amd64")
# python3-bcrypt: basic-auth hashes of --web.config.file; pytest-timeout: no test hangs;
# venv, setuptools, wheel: the README's venv route, installed by tests/guest/test_installed.py
# (as dpkg -i in the guest they cost minutes under TCG: byte-compiling, Python upgrades).
APT_PACKAGES = ("python3-bcrypt", "python3-pytest-timeout", "python3-venv", "python3-setuptools", "python3-wheel")

# Modules the initramfs loads to mount the 9p shares; their dependencies come from modules.dep.
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p")

# Host tools: binary -> Debian package that ships it.
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "mmdebstrap": "mmdebstrap",
    "busybox": "busybox-static",
    "xz": "xz-utils",
    "zstd": "zstd",
}

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# /init of the initramfs: mount the 9p shares and hand over to the checkout's guest-init.
# Any failure powers off (and says why on the console) instead of leaving a hung guest.
INIT_SCRIPT = r"""#!/bin/sh
export PATH=/bin
die() {
    echo "initramfs: FATAL: $*"
    echo o >/proc/sysrq-trigger
    sleep 5
    poweroff -f
}
mount -t proc proc /proc || die "cannot mount /proc"
mount -t sysfs sysfs /sys || die "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || die "cannot mount /dev"
for m in $(cat /modules.load); do
    insmod "/modules/$m" || die "insmod $m failed"
done
opts=trans=virtio,version=9p2000.L,msize=512000
# cache=loose is safe for the root: it is read-only and nobody changes it during a run.
mount -t 9p -o "ro,$opts,cache=loose" rootfs /newroot || die "cannot mount the image root (9p tag rootfs)"
mount -t 9p -o "$opts" src /newroot/src || die "cannot mount the checkout (9p tag src)"
mount -t 9p -o "$opts" vm /newroot/vm || die "cannot mount the run directory (9p tag vm)"
[ -r /newroot/src/tests/vm/guest-init ] || die "no tests/vm/guest-init in the checkout"
umount /proc /sys
mount --move /dev /newroot/dev || die "cannot move /dev"
# Should this exec fail, sh exits: PID 1 dying panics, and QEMU (-no-reboot) quits.
exec switch_root /newroot /bin/sh /src/tests/vm/guest-init
"""
BUSYBOX_APPLETS = ("sh", "mount", "umount", "insmod", "cat", "echo", "sleep", "poweroff", "switch_root")


def log(msg: str) -> None:
    print(f"image: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- cache layout


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tracer-exporter" / "images"


# Bump when the build steps themselves change (mmdebstrap's arguments, the chroot's
# configuration): the data below is hashed, the code is not.
RECIPE = 2


def recipe_hash(name: str) -> str:
    # Only what goes into the image: guest-init is read from the checkout at every boot,
    # and each distro's key leaves the other entries out, so adding a distro rebuilds none.
    recipe = {
        "recipe": RECIPE,
        "distro": asdict(DISTROS[name]),
        "base": BASE_PACKAGES,
        "kernel": KERNEL_PACKAGES,
        "apt": APT_PACKAGES,
        "initramfs": INITRAMFS_MODULES,
        "init": INIT_SCRIPT,
        "busybox": BUSYBOX_APPLETS,
        "path": CHROOT_PATH,
    }
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def image_path(distro: str) -> Path:
    return cache_root() / f"{distro}-{recipe_hash(distro)}"


def load_info(path: Path) -> dict[str, object]:
    return json.loads((path / "info.json").read_text())


def is_built(path: Path) -> bool:
    return (path / "info.json").is_file()


# ---------------------------------------------------------------- host tools


def _is_static_elf(path: str) -> bool:
    # A dynamic busybox would not run in our library-less initramfs: look for PT_INTERP.
    with open(path, "rb") as f:
        hdr = f.read(64)
        if hdr[:4] != b"\x7fELF" or hdr[4] != 2:
            return False
        phoff = int.from_bytes(hdr[0x20:0x28], "little")
        phentsize = int.from_bytes(hdr[0x36:0x38], "little")
        phnum = int.from_bytes(hdr[0x38:0x3A], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(int.from_bytes(table[i : i + 4], "little") != 3 for i in range(0, len(table), phentsize))


def _tool_ok(binary: str) -> bool:
    # Tools in /usr/sbin, which a non-login PATH may lack.
    if not (shutil.which(binary) or os.path.exists(f"/usr/sbin/{binary}")):
        return False
    return binary != "busybox" or _is_static_elf(busybox_path())


def busybox_path() -> str:
    return shutil.which("busybox") or "/bin/busybox"


def ensure(binaries: tuple[str, ...] = tuple(HOST_TOOLS)) -> None:
    """Install the Debian packages of any missing host tool (apt-get update once, then install)."""
    missing = sorted({HOST_TOOLS[b] for b in binaries if not _tool_ok(b)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"image: missing host packages {' '.join(missing)}; install them as root")
    apt_log = cache_root() / "host-packages.log"
    apt_log.parent.mkdir(parents=True, exist_ok=True)
    log(f"installing host packages: {' '.join(missing)} (log: {apt_log})")
    t0 = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # No recommends: qemu-system-x86 would bring its GUI, audio and storage plugins.
    for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        with open(apt_log, "a") as out:
            res = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if res.returncode != 0:
            sys.stderr.write("\n".join(apt_log.read_text(errors="replace").splitlines()[-30:]) + "\n")
            raise SystemExit(f"image: {' '.join(argv[:2])} failed (exit {res.returncode}); log: {apt_log}")
    log(f"host packages installed in {time.monotonic() - t0:.0f} s")
    still = [b for b in binaries if not _tool_ok(b)]
    if still:
        raise SystemExit(f"image: still missing after install: {' '.join(still)}")


# ---------------------------------------------------------------- safe deletion


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. escaped as \ooo.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def safe_rmtree(path: Path) -> None:
    """rm -rf that first detaches anything mounted inside (a chroot's /proc, /dev...)."""
    if not path.exists() and not path.is_symlink():
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)
    left = _mounts_under(path)
    if left:
        raise RuntimeError(f"refusing to delete {path}: still mounted: {left}")
    shutil.rmtree(path)


# ---------------------------------------------------------------- chroot helpers


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """Fresh proc/sysfs/tmpfs-dev for apt in the chroot; never the host's /dev bound in."""
    mounted: list[Path] = []
    try:
        for fstype, target, opts in (
            ("proc", "proc", "nosuid,nodev,noexec"),
            ("sysfs", "sys", "ro,nosuid,nodev,noexec"),
            ("tmpfs", "dev", "mode=0755,nosuid"),
            ("devpts", "dev/pts", "newinstance,ptmxmode=0666,mode=0620,gid=5"),
        ):
            point = root / target
            point.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", fstype, "-o", opts, fstype, str(point)], check=True)
            mounted.append(point)
            if target == "dev":
                for name, devnum in {
                    "null": (1, 3),
                    "zero": (1, 5),
                    "full": (1, 7),
                    "random": (1, 8),
                    "urandom": (1, 9),
                    "tty": (5, 0),
                }.items():
                    os.mknod(point / name, 0o20666, os.makedev(*devnum))
                    os.chmod(point / name, 0o666)
                for name, target_ in {
                    "ptmx": "pts/ptmx",
                    "fd": "/proc/self/fd",
                    "stdin": "/proc/self/fd/0",
                    "stdout": "/proc/self/fd/1",
                    "stderr": "/proc/self/fd/2",
                }.items():
                    os.symlink(target_, point / name)
                (point / "shm").mkdir()
        yield
    finally:
        for point in reversed(mounted):
            if subprocess.run(["umount", str(point)], check=False).returncode != 0:
                subprocess.run(["umount", "--lazy", str(point)], check=False)


def chroot(root: Path, *argv: str, out: Path, capture: bool = False) -> str:
    env = {"PATH": CHROOT_PATH, "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8", "HOME": "/root"}
    with open(out, "a") as logf:
        logf.write(f"\n$ chroot {' '.join(argv)}\n")
        logf.flush()
        res = subprocess.run(
            ["chroot", str(root), *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else logf,
            stderr=logf,
            text=True,
        )
    if res.returncode != 0:
        raise BuildError(f"chroot {' '.join(argv)} failed (exit {res.returncode})", out)
    return res.stdout or ""


class BuildError(Exception):
    def __init__(self, msg: str, build_log: Path) -> None:
        super().__init__(msg)
        self.build_log = build_log


def root_path(root: Path, path: str) -> Path:
    """Host path of a guest path; absolute symlinks inside the image point into the image."""
    p = root
    for part in Path(path).relative_to("/").parts:
        p = p / part
        hops = 0
        while p.is_symlink():
            target = os.readlink(p)
            p = root / target.lstrip("/") if target.startswith("/") else p.parent / target
            hops += 1
            if hops > 20:
                raise RuntimeError(f"symlink loop at {path} in {root}")
    return p


def mirror_of(root: Path) -> str:
    """The archive URL the build used, read back from the chroot's apt sources."""
    sources = root / "etc/apt/sources.list"
    if sources.is_file():
        for line in sources.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[0] == "deb":
                return fields[1].rstrip("/")
    for deb822 in sorted((root / "etc/apt/sources.list.d").glob("*.sources")):
        for line in deb822.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1].rstrip("/")
    raise RuntimeError(f"no apt source in {root}/etc/apt")


# ---------------------------------------------------------------- initramfs


def _newc(entries: list[tuple[str, int, bytes, tuple[int, int]]]) -> bytes:
    """A cpio archive in the kernel's "newc" format (all files root-owned, mtime 0)."""
    out = bytearray()
    # Distinct inode numbers: the kernel's unpacker would take equal ones for hard links.
    for ino, (name, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", (0, 0))], start=1):
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4)
        out += data + b"\0" * (-len(data) % 4)
    return bytes(out)


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _read_module(path: Path) -> bytes:
    # busybox insmod cannot read compressed modules.
    raw = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc", str(path)], check=True, capture_output=True).stdout
    return raw


def initramfs_modules(moddir: Path, wanted: tuple[str, ...] = INITRAMFS_MODULES) -> list[Path]:
    """Module files to insmod, dependencies first; built-in ones are skipped."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[_module_name(mod)] = (mod, [_module_name(d) for d in rest.split()])
    builtin_file = moddir / "modules.builtin"
    builtin = {_module_name(p) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()
    order: list[str] = []

    def visit(name: str) -> None:
        if name in builtin or name in order:
            return
        if name not in deps:
            raise RuntimeError(f"module {name} is neither in modules.dep nor built in ({moddir})")
        for dep in deps[name][1]:
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(name)
    return [moddir / deps[n][0] for n in order]


def build_initramfs(moddir: Path | None, dest: Path) -> list[str]:
    """Write the initramfs; moddir None: a kernel with 9p and virtio built in needs no modules."""
    mods = initramfs_modules(moddir) if moddir is not None else []
    names = [f"{_module_name(m.name)}.ko" for m in mods]
    none = (0, 0)
    entries = [(d, 0o40755, b"", none) for d in ("bin", "dev", "proc", "sys", "modules", "newroot")]
    entries.append(("dev/console", 0o20600, b"", (5, 1)))
    entries.append(("bin/busybox", 0o100755, Path(busybox_path()).read_bytes(), none))
    entries += [(f"bin/{a}", 0o120777, b"busybox", none) for a in BUSYBOX_APPLETS]
    entries.append(("init", 0o100755, INIT_SCRIPT.encode(), none))
    entries.append(("modules.load", 0o100644, "".join(f"{n}\n" for n in names).encode(), none))
    entries += [(f"modules/{n}", 0o100644, _read_module(m), none) for n, m in zip(names, mods)]
    dest.write_bytes(gzip.compress(_newc(entries), compresslevel=6, mtime=0))
    return names


# ---------------------------------------------------------------- kernel


def _has_pvh_note(elf: bytes) -> bool:
    """Does this ELF kernel carry the Xen PVH entry note (QEMU can then boot it directly)?"""
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    for i in range(int.from_bytes(elf[0x38:0x3A], "little")):
        ph = elf[phoff + i * phentsize : phoff + (i + 1) * phentsize]
        if int.from_bytes(ph[0:4], "little") != 4:  # PT_NOTE
            continue
        off, size = int.from_bytes(ph[8:16], "little"), int.from_bytes(ph[32:40], "little")
        notes, pos = elf[off : off + size], 0
        while pos + 12 <= len(notes):
            namesz, descsz, ntype = (int.from_bytes(notes[pos + k : pos + k + 4], "little") for k in (0, 4, 8))
            name = notes[pos + 12 : pos + 12 + namesz]
            if name == b"Xen\0" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(vmlinuz: Path) -> bytes | None:
    """The uncompressed kernel inside a bzImage, if it can boot through PVH.

    Under TCG, the bzImage decompressing itself (plus the BIOS path) costs about 3 s
    of every boot; QEMU boots a PVH-capable ELF vmlinux directly.
    """
    data = vmlinuz.read_bytes()
    for magic in (b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x1f\x8b\x08"):
        start = data.find(magic)
        if start < 0:
            continue
        try:
            if magic.startswith(b"\xfd"):
                elf = lzma.LZMADecompressor().decompress(data[start:])
            elif magic.startswith(b"\x1f"):
                elf = zlib.decompressobj(wbits=31).decompress(data[start:])
            else:
                elf = subprocess.run(["zstd", "-dcq"], input=data[start:], capture_output=True).stdout
        except (lzma.LZMAError, zlib.error):
            continue
        if elf[:4] == b"\x7fELF" and _has_pvh_note(elf):
            return elf
    return None


def kernel_image(root: Path, release: str) -> Path | None:
    """The image's vmlinuz: in /boot, or (Debian's split 7.x packages) beside its modules."""
    for path in (f"/boot/vmlinuz-{release}", f"/usr/lib/modules/{release}/vmlinuz"):
        if root_path(root, path).is_file():
            return root_path(root, path)
    return None


def cached_versions(cache: Path, name: str, building: bool = False) -> list[Path]:
    """<name>-<hash> entries of a cache (or <name>-<hash>.tmp<pid> ones, building).

    An exact match: a glob of "trixie-*" would take trixie-backports' images too.
    """
    pattern = re.compile(re.escape(name) + (r"-[0-9a-f]{16}\.tmp\d+" if building else r"-[0-9a-f]{16}"))
    return sorted(p for p in cache.iterdir() if pattern.fullmatch(p.name))


def _in_use(path: Path) -> bool:
    # A QEMU still running on an old image (another checkout, another branch) keeps it.
    needle = str(path).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if needle in cmdline.read_bytes():
                return True
    return False


# ---------------------------------------------------------------- build


def kernel_spec(distro: Distro, package: str) -> str:
    """A kernel package from its suite: apt picks security's newer build by itself, but a
    backports one only when asked (pkg/suite; apt then takes the dependencies it needs from there too)."""
    return f"{package}/{distro.kernel_suite}" if distro.kernel_suite in distro.extra_suites else package


def security_mirror(mirror: str) -> str:
    return mirror + "-security"  # standard Debian layout: <mirror>-security next to <mirror>


def sources(distro: Distro, mirror: str) -> list[str]:
    security = security_mirror(mirror)
    lines = [f"deb {mirror} {distro.suite} main"]
    lines += [f"deb {mirror} {s} main" for s in distro.extra_suites]
    lines.append(f"deb {security} {distro.suite}-security main")
    return lines


# Before the kernel is unpacked: no initramfs is made in the chroot, we boot our own.
NO_INITRAMFS_HOOK = (
    'chroot "$1" dpkg-divert --local --rename --add /usr/sbin/update-initramfs'
    ' && ln -sf /bin/true "$1/usr/sbin/update-initramfs"'
)


def _bootstrap(distro: Distro, root: Path, build_log: Path) -> None:
    """Every package in one apt run: bookworm in 39 s here, where debootstrap and two apt runs took 65 s."""
    packages = (
        *BASE_PACKAGES,
        *(kernel_spec(distro, p) for p in KERNEL_PACKAGES),
        *distro.kernel_packages,
        *APT_PACKAGES,
        *distro.packages,
    )
    argv = [
        shutil.which("mmdebstrap") or "/usr/bin/mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        f"--include={','.join(packages)}",
        f"--essential-hook={NO_INITRAMFS_HOOK}",
        distro.suite,
        str(root),
        *sources(distro, os.environ.get("TRACER_VM_MIRROR", DEFAULT_MIRROR).rstrip("/")),
    ]
    with open(build_log, "a") as logf:
        logf.write(f"$ {' '.join(argv)}\n")
        logf.flush()
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
    if res.returncode != 0:
        raise BuildError(f"mmdebstrap {distro.suite} failed (exit {res.returncode})", build_log)


def _configure(name: str, distro: Distro, root: Path, build_log: Path) -> dict[str, object]:
    mirror = mirror_of(root)
    security = security_mirror(mirror)
    with chroot_mounts(root):
        pyver = chroot(
            root,
            "python3",
            "-c",
            "import sys; print('%d.%d' % sys.version_info[:2])",
            out=build_log,
            capture=True,
        ).strip()
        versions = chroot(
            root,
            "dpkg-query",
            "-W",
            "-f",
            "${Package} ${Version}\n",
            "python3-bpfcc",
            "linux-image-amd64",
            "linux-headers-amd64",
            out=build_log,
            capture=True,
        )
        chroot(root, "apt-get", "clean", out=build_log)

    moddirs = sorted(p for p in root_path(root, "/lib/modules").iterdir() if (p / "build").is_symlink())
    if len(moddirs) != 1:
        raise BuildError(f"expected one kernel with headers in /lib/modules, found {moddirs}", build_log)
    release = moddirs[0].name
    build_link = moddirs[0] / "build"
    if not root_path(root, f"/lib/modules/{release}/build/Makefile").is_file():
        raise BuildError(f"{build_link} -> {os.readlink(build_link)} has no Makefile", build_log)
    if kernel_image(root, release) is None:
        raise BuildError(f"no /boot/vmlinuz-{release} or /usr/lib/modules/{release}/vmlinuz in the image", build_log)

    # The checkout (shared at /src) is importable, and the console script runs it.
    site = root / f"usr/local/lib/python{pyver}/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "tracer-exporter-src.pth").write_text("/src\n")
    script = root / "usr/local/bin/tracer-exporter"
    script.write_text("#!/usr/bin/python3\nfrom tracer_exporter.cli import main\n\nraise SystemExit(main())\n")
    script.chmod(0o755)

    for mountpoint in ("src", "vm"):
        (root / mountpoint).mkdir(exist_ok=True)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    for old in (root / "boot").glob("initrd.img-*"):
        old.unlink()

    return {
        "distro": name,
        "release": release,
        "python": pyver,
        "packages": dict(line.split(" ", 1) for line in versions.splitlines() if line),
        "mirror": mirror,
        "security_mirror": security,
    }


def build(name: str, force: bool = False) -> Path:
    """Build the image for a distro unless the cache already has it; return its directory."""
    if name not in DISTROS:
        raise SystemExit(f"image: unknown distro {name!r}; known: {', '.join(DISTROS)}")
    final = image_path(name)
    if is_built(final) and not force:
        return final
    if os.geteuid() != 0:
        raise SystemExit("image: building an image needs root (mmdebstrap, chroot, mount)")
    ensure()
    cache = cache_root()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{name}.lock", "w") as lockf:
        try:
            fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another build of {name} is running; waiting for it")
            fcntl.flock(lockf, fcntl.LOCK_EX)
        if is_built(final) and not force:
            return final  # the other build made it
        # Anything half-built is from a build that died: we hold the lock.
        for stale in cached_versions(cache, name, building=True):
            safe_rmtree(stale)
        tmp = cache / f"{final.name}.tmp{os.getpid()}"
        tmp.mkdir()
        build_log = tmp / "build.log"
        started = time.monotonic()
        try:
            info = _build_into(name, DISTROS[name], tmp, build_log)
        except BaseException:
            # Keep the build log where the next person can read it; drop the rest.
            with contextlib.suppress(OSError):
                shutil.copyfile(build_log, cache / f"{name}-failed-build.log")
                log(f"build log kept at {cache / f'{name}-failed-build.log'}")
            safe_rmtree(tmp)
            raise
        info["build_seconds"] = round(time.monotonic() - started, 1)
        (tmp / "info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if final.exists():
            safe_rmtree(final)  # --force
        os.rename(tmp, final)
        for old in cached_versions(cache, name):
            if old != final and old.is_dir() and not _in_use(old):
                safe_rmtree(old)
        log(f"built {name} (kernel {info['release']}) in {info['build_seconds']} s: {final}")
        return final


def _build_into(name: str, distro: Distro, tmp: Path, build_log: Path) -> dict[str, object]:
    root = tmp / "root"
    t0 = time.monotonic()
    log(f"building {name}: mmdebstrap, kernel from {distro.kernel_suite} (log: {build_log})")
    try:
        _bootstrap(distro, root, build_log)
        log(f"mmdebstrap done in {time.monotonic() - t0:.0f} s; initramfs next")
        info = _configure(name, distro, root, build_log)
    except BuildError as e:
        tail = e.build_log.read_text(errors="replace").splitlines()[-40:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise SystemExit(f"image: {e}") from None
    release = str(info["release"])
    vmlinuz = kernel_image(root, release)
    assert vmlinuz is not None  # checked by _configure
    shutil.copyfile(vmlinuz, tmp / "vmlinuz")
    vmlinux = extract_vmlinux(tmp / "vmlinuz")
    if vmlinux is not None:
        (tmp / "vmlinux").write_bytes(vmlinux)
    mods = build_initramfs(root_path(root, f"/lib/modules/{release}"), tmp / "initrd.cpio.gz")
    info.update(recipe=recipe_hash(name), initramfs_modules=mods, built=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return info


def get(name: str) -> Path:
    """The image directory for a distro, built on first use."""
    path = image_path(name)
    return path if is_built(path) else build(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_build = sub.add_parser("build", help="build the image unless cached")
    p_build.add_argument("--distro", default=DEFAULT_DISTRO, choices=sorted(DISTROS))
    p_build.add_argument("--force", action="store_true", help="rebuild even if cached")
    p_path = sub.add_parser("path", help="print the image directory (built or not)")
    p_path.add_argument("--distro", default=DEFAULT_DISTRO, choices=sorted(DISTROS))
    sub.add_parser("ensure", help="install missing host tools")
    args = parser.parse_args(argv)
    if args.cmd == "build":
        print(build(args.distro, force=args.force))
    elif args.cmd == "path":
        print(image_path(args.distro))
    else:
        ensure()
    return 0


if __name__ == "__main__":
    sys.exit(main())
