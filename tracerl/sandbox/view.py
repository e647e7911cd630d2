"""What S sees of the host's file system: an allowlist, not a denylist.

A program that walks the file system for ``*.jsonl`` must not find the file being scored, a
checkpoint, or a sibling's submission, wherever they lie.  So S does not get the host's tree
with a few directories hidden: it gets a new, empty root (a small tmpfs) into which exactly
these host paths are bind-mounted read-only, at their own paths:

* the interpreter (with the chain of symbolic links that leads to it) and its standard library;
* the shared libraries the interpreter and the standard library's extension modules load (found
  with ``ldd``; each library file, plus the system's multiarch library directory that holds
  ``libc``, for libraries loaded at run time), the dynamic loader and ``/etc/ld.so.cache``;
* with ``Limits.site_packages``: either the caller's whole virtual environment (``True``), or
  only the named top-level packages (``("numpy",)``), each with its ``<name>.libs`` directory;

and besides them a private writable ``/tmp`` (the working directory and ``$HOME``), a private
``/dev/shm`` (``multiprocessing`` needs it), ``/dev/null``, ``/dev/zero``, ``/dev/full``,
``/dev/random``, ``/dev/urandom``, and a fresh ``/proc`` of S's pid namespace.  Then S moves
into it with ``pivot_root`` and detaches the old root, so no path leads back to the host.

:func:`view_plan` (run in P, once per setting) resolves what to bind; :func:`build_view` (run in
S between ``fork`` and ``execve``, inside the mount namespace) builds it.  Where the view cannot
be built (no ``pivot_root``, a missing path), :mod:`.isolation` falls back to the read-only host
with hidden directories and reports ``filesystem_view: "host-readonly"``.
"""

from __future__ import annotations

import functools
import os
import sys

from .syscalls import (
    _MNT_DETACH,
    _MS_BIND,
    _MS_NODEV,
    _MS_NOEXEC,
    _MS_NOSUID,
    _MS_PRIVATE,
    _MS_RDONLY,
    _MS_REC,
    _MS_REMOUNT,
    _mount,
    _pivot_root,
    _statvfs_flags,
    _umount2,
)

DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
              "stderr": "/proc/self/fd/2"}


# =============================================================================================
# P: which host paths S sees.
# =============================================================================================


def _resolve_chain(path, links, depth=0):
    """The real path behind ``path``; every symbolic link met on the way goes into ``links``
    (link path -> its target) so that S's root can reproduce the same path."""
    if depth > 40:
        raise OSError(f"too many levels of symbolic links: {path}")
    parts = [p for p in path.split("/") if p]
    cur = ""
    for i, comp in enumerate(parts):
        nxt = f"{cur}/{comp}"
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            links[nxt] = target
            # ``cur`` holds no link (we walk from the root), so joining lexically is exact.
            resolved = os.path.normpath(os.path.join(cur or "/", target))
            rest = "/".join(parts[i + 1:])
            return _resolve_chain(f"{resolved}/{rest}" if rest else resolved, links, depth + 1)
        cur = nxt
    return cur or "/"


def _shared_libraries(binaries):
    """Absolute paths of the shared libraries (and the loader) ``binaries`` need, per ``ldd``."""
    import subprocess

    found = set()
    for start in range(0, len(binaries), 200):
        try:
            out = subprocess.run(["ldd", *binaries[start:start + 200]], capture_output=True,
                                 text=True, timeout=60, env={"LC_ALL": "C", "PATH": os.environ.get(
                                     "PATH", "/usr/bin:/bin")}).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            for token in line.replace("=>", " ").split():
                if token.startswith("/") and not token.endswith(":") and os.path.exists(token):
                    found.add(token)
    return found


def _elf_needed(path):
    """(DT_NEEDED names, DT_RUNPATH/DT_RPATH directories) of a 64-bit little-endian ELF file,
    read from its dynamic section; None for anything else (the caller then asks ``ldd``)."""
    import mmap
    import struct

    try:
        with open(path, "rb") as fh:
            data = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    try:
        return _parse_dynamic(data, path)
    except (ValueError, IndexError, struct.error):
        return None
    finally:
        data.close()


def _parse_dynamic(data, path):
    import struct

    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return [], []
    entries = []
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:
            break
        entries.append((tag, val))
    strtab = next((v for t, v in entries if t == 5), None)  # DT_STRTAB, a virtual address
    base = next((off + strtab - va for va, off, size in loads if va <= strtab < va + size), None) \
        if strtab is not None else None
    if base is None:
        return None

    def string(offset):
        end = data.find(b"\0", base + offset)
        return data[base + offset:end].decode("utf-8", "replace")

    needed = [string(v) for t, v in entries if t == 1]  # DT_NEEDED
    origin = os.path.dirname(os.path.realpath(path))
    runpath = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin)
               for t, v in entries if t in (15, 29) for d in string(v).split(":") if d]
    return needed, runpath


def _shared_libraries_fast(interpreter, modules):
    """The libraries of ``interpreter`` (``ldd``: one call) and of the extension ``modules``
    (their ELF dynamic sections, looked up in the interpreter's library directories and their
    own run paths; ``ldd`` only for a module whose libraries are not found so)."""
    libs = _shared_libraries([interpreter])
    if libs is None:
        return None
    dirs = sorted({os.path.dirname(p) for p in libs})
    unresolved, queue, seen = [], list(modules), set()
    while queue:  # the modules, then every library they need, transitively
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        info = _elf_needed(path)
        if info is None:
            unresolved.append(path)
            continue
        needed, runpath = info
        for name in needed:
            hit = next((os.path.join(d, name) for d in runpath + dirs
                        if os.path.exists(os.path.join(d, name))), None)
            if hit is None:
                unresolved.append(path)
                break
            libs.add(hit)
            queue.append(hit)
    if unresolved:
        more = _shared_libraries(unresolved)
        if more is None:
            return None
        libs |= more
    return libs


def _package_paths(names):
    """Host paths of the named top-level packages, and the directories to put on sys.path."""
    import glob
    import importlib.util

    paths, roots = [], []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ValueError(f"Limits.site_packages: no package {name!r} is installed")
        if spec.submodule_search_locations:
            locations = list(spec.submodule_search_locations)
        elif spec.origin and os.path.isfile(spec.origin):
            locations = [spec.origin]
        else:
            raise ValueError(f"Limits.site_packages: {name!r} is not a file or a package")
        for loc in locations:
            parent = os.path.dirname(os.path.abspath(loc))
            paths.append(os.path.abspath(loc))
            paths.extend(glob.glob(os.path.join(parent, f"{name}.libs")))  # auditwheel libraries
            if parent not in roots:
                roots.append(parent)
    return paths, roots


def _outermost(paths):
    paths = sorted(set(paths))
    return [p for p in paths if not any(p.startswith(q.rstrip("/") + "/") for q in paths if q != p)]


@functools.lru_cache(maxsize=8)
def view_plan(site_packages=False):
    """What S's root holds: ``{"interpreter", "interpreter_args", "binds", "links", "masks",
    "python_path"}``.  ``binds`` are real host paths bound read-only at the same path; ``links``
    are symbolic links recreated in the new root; ``masks`` are directories inside a bind left
    empty (the base interpreter's own site-packages); ``python_path`` is added to S's
    ``sys.path``."""
    import glob  # P only: J and S import this module for build_view and need neither
    import sysconfig

    if site_packages is True:  # the caller's whole environment, ``site`` included
        exe, args = sys.executable, ["-I"]
    else:
        exe, args = os.path.realpath(sys.executable), ["-I", "-S"]
    wanted = [exe]
    # The base interpreter's standard library (in a virtual environment "platstdlib" would
    # otherwise name the environment's own lib directory, site-packages included).
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
            "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
    stdlib = {sysconfig.get_paths(vars=base)[k] for k in ("stdlib", "platstdlib")}
    wanted += sorted(stdlib)
    python_path = []
    if site_packages is True:
        import site

        wanted += [os.path.join(sys.prefix, "pyvenv.cfg")] + site.getsitepackages()
    elif site_packages:
        pkg_paths, python_path = _package_paths(tuple(site_packages))
        wanted += pkg_paths
    modules = sorted(m for d in stdlib for m in glob.glob(os.path.join(d, "lib-dynload", "*.so")))
    libs = _shared_libraries_fast(os.path.realpath(exe), modules)
    if libs is None:  # no ldd: the usual library directories instead
        libs = [p for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(p)]
    else:
        libs = sorted(libs)
        # The directory that holds libc: libraries loaded at run time (dlopen) live there too.
        libc_dirs = {os.path.dirname(p) for p in libs if os.path.basename(p).startswith("libc.")}
        libs += [d for d in libc_dirs if "-linux-" in os.path.basename(d)]
    wanted += libs
    if os.path.exists("/etc/ld.so.cache"):
        wanted.append("/etc/ld.so.cache")
    # Site-packages directories inside the standard library's tree stay empty, unless asked for.
    masks = [] if site_packages is True else [
        d for d in (sysconfig.get_paths(vars=base)[k] for k in ("purelib", "platlib"))
        if os.path.isdir(d)]
    links, real = {}, []
    for p in wanted:
        if os.path.lexists(p):
            real.append(_resolve_chain(os.path.abspath(p), links))
    binds = _outermost(p for p in real if os.path.exists(p))
    # A link inside a bound directory comes with it.
    links = {k: v for k, v in links.items()
             if not any(k.startswith(b.rstrip("/") + "/") for b in binds)}
    masks = sorted({os.path.realpath(m) for m in masks} - set(binds))
    return {"interpreter": exe, "interpreter_args": args, "binds": binds, "links": links,
            "masks": masks, "python_path": python_path}


# =============================================================================================
# S (before execve, in its own mount namespace): build the root and move into it.
# =============================================================================================


def _make_mount_point(path, source_fd):
    import stat

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if stat.S_ISDIR(os.fstat(source_fd).st_mode):
        os.makedirs(path, exist_ok=True)
    elif not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def _bind_readonly(source_fd, target, keep_devices=False):
    # From the descriptor opened before the scratch root covered ``base``: a source below
    # ``base`` (a virtual environment under /tmp) stays reachable.
    _mount(f"/proc/self/fd/{source_fd}", target, None, _MS_BIND | _MS_REC)
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _statvfs_flags(target)
    if not keep_devices:
        flags |= _MS_NODEV
    _mount(None, target, None, flags)


class ViewError(RuntimeError):
    """The view failed after ``pivot_root``: the sandbox must not start (no fallback)."""


def build_view(plan, tmp_mib, shm_mib, base="/tmp"):
    """Build S's root at ``base`` (a scratch mount point) and ``pivot_root`` into it.

    Returns the report entries.  Raises OSError when the view cannot be completed before the
    switch (the caller then undoes it with :func:`abandon_view` and falls back), ViewError
    after it."""
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we do propagates to the host
    devices = [f"/dev/{name}" for name in DEVICES if os.path.exists(f"/dev/{name}")]
    sources = {}
    try:
        for path in list(plan["binds"]) + devices:
            sources[path] = os.open(path, os.O_PATH | os.O_CLOEXEC)
        _mount("tmpfs", base, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=4m,mode=755")
        _populate(plan, sources, devices, base.rstrip("/"), tmp_mib, shm_mib)
    finally:
        for fd in sources.values():
            os.close(fd)
    return _enter(base.rstrip("/"), plan)


def _populate(plan, sources, devices, root, tmp_mib, shm_mib):
    # The private /tmp first: paths bound from below the host's /tmp then sit on top of it.
    os.makedirs(root + "/tmp")
    _mount("tmpfs", root + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={tmp_mib}m,mode=1777")
    for link, target in sorted(plan["links"].items()):
        os.makedirs(root + os.path.dirname(link), exist_ok=True)
        if not os.path.lexists(root + link):
            os.symlink(target, root + link)
    for path in plan["binds"]:
        _make_mount_point(root + path, sources[path])
        _bind_readonly(sources[path], root + path)
    for path in plan["masks"]:
        if os.path.isdir(root + path):
            _mount("tmpfs", root + path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY,
                   "size=4k,mode=755")
    os.makedirs(root + "/dev/shm")
    for path in devices:
        _make_mount_point(root + path, sources[path])
        _bind_readonly(sources[path], root + path, keep_devices=True)
    for name, target in _DEV_LINKS.items():
        os.symlink(target, f"{root}/dev/{name}")
    _mount("tmpfs", root + "/dev/shm", "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={shm_mib}m,mode=1777")
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)


def _enter(root, plan):
    """``pivot_root`` into the populated root and detach the host's tree."""
    os.makedirs(root + "/.host")
    os.chdir(root)
    _pivot_root(".", ".host")
    try:  # past this point there is no way back: fail closed, never run with /.host attached
        os.chdir("/")
        _umount2("/.host", _MNT_DETACH)
        os.rmdir("/.host")
        _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    except OSError as exc:
        raise ViewError(f"after pivot_root: {exc}") from None
    return {"filesystem_view": "allowlist", "readonly_filesystem": True, "private_tmp": True,
            "private_proc": True, "private_dev_shm": True,
            "visible_paths": sorted(plan["binds"]), "hidden_paths": list(plan["masks"])}


def abandon_view(base="/tmp"):
    """Undo a half-built view (before ``pivot_root``): detach the scratch root."""
    try:
        os.chdir("/")
        _umount2(base, _MNT_DETACH)
    except OSError:
        pass
