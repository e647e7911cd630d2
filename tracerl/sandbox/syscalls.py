"""The few Linux system calls the sandbox needs that :mod:`os` lacks, through :mod:`ctypes`."""

from __future__ import annotations

import os


# =============================================================================================
# Thin libc layer (namespaces, mounts, prctl).  Imported lazily: S never needs it after execve.
# =============================================================================================


_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000

_MS_RDONLY = 1
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_NOEXEC = 8
_MS_REMOUNT = 32
_MS_NOATIME = 1024
_MS_NODIRATIME = 2048
_MS_BIND = 4096
_MS_REC = 16384
_MS_PRIVATE = 1 << 18
_MS_RELATIME = 1 << 21

_MNT_DETACH = 2

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36

_SYS_MOUNT_SETATTR = 442  # same number on every architecture (new-style syscall table)
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MOUNT_ATTR_NODEV = 0x4
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _errcheck(rc, what):
    if rc != 0:
        import ctypes

        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags):
    import ctypes

    _errcheck(_libc().unshare(ctypes.c_int(flags)), "unshare")


def _mount(source, target, fstype, flags, data=None):
    import ctypes

    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    rc = _libc().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    _errcheck(rc, f"mount {target}")


# pivot_root has no libc wrapper; its number differs between architectures.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217,
                   "i686": 217, "armv7l": 218}


def _pivot_root(new_root, put_old):
    import ctypes
    import platform

    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(38, f"pivot_root: unknown syscall number on {platform.machine()}")
    _errcheck(_libc().syscall(ctypes.c_long(number), new_root.encode(), put_old.encode()),
              "pivot_root")


def _umount2(target, flags):
    import ctypes

    _errcheck(_libc().umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def _prctl(option, arg):
    import ctypes

    c = ctypes.c_ulong
    _errcheck(_libc().prctl(ctypes.c_int(option), c(arg), c(0), c(0), c(0)), f"prctl {option}")


def _mount_setattr_readonly_recursive(path):
    import ctypes

    class _MountAttr(ctypes.Structure):
        _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                    ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
    rc = _libc().syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD),
                         path.encode(), ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr)))
    _errcheck(rc, "mount_setattr")


def _statvfs_flags(path):
    """Mount flags to keep when remounting (locked flags must be kept inside a user namespace)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, _MS_NOSUID), (os.ST_NODEV, _MS_NODEV),
                   (os.ST_NOEXEC, _MS_NOEXEC), (getattr(os, "ST_NOATIME", 1024), _MS_NOATIME),
                   (getattr(os, "ST_NODIRATIME", 2048), _MS_NODIRATIME),
                   (getattr(os, "ST_RELATIME", 4096), _MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _remount_all_readonly():
    """Fallback for kernels without mount_setattr: remount every mount point read-only."""
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 4:
                points.append(parts[4].replace("\\040", " "))
    failed = []
    for mp in sorted(set(points), key=len):
        try:
            _mount(None, mp, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
                   | _statvfs_flags(mp))
        except OSError:
            failed.append(mp)
    if "/" in failed:
        raise OSError(1, "could not remount / read-only")
    return failed


def _write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
