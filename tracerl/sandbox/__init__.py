"""Process-isolated execution of untrusted Python programs, and the judge that scores them.

This package is the isolation layer under :mod:`tracerl.rewards.code`.  It uses the standard
library only, because the *judge* loads it by path in an interpreter without site-packages, and
its harness modules, shipped as code over a pipe, run inside the sandbox.

Process tree for one scored program
-----------------------------------
::

    caller (P) --Popen--> judge (J) --fork--> intermediary (C) --fork--> sandbox (S) [--fork--> run (R)]

* **P**, the calling process (trainer, evaluator, test).  It never runs program or test code.  It
  sends one job (program, tests, limits) to J on J's stdin and reads back one JSON object: the
  verdicts.  J runs in its own session; P kills that whole group when J overruns its wall time.
* **J**, the judge: ``python -I -S`` loading :mod:`.judge` by path (see :mod:`.caller`).
  Trusted: it runs only the *test* code (HumanEval ``check``, MBPP ``assert`` lines, stdio
  comparisons) and holds the expected values.  It is made non-dumpable (``PR_SET_DUMPABLE=0``:
  a same-uid process can neither ptrace it nor open its ``/proc/<pid>/mem`` or
  ``/proc/<pid>/fd``) and dies with P (``PR_SET_PDEATHSIG``).
* **C**, the disposable intermediary.  It creates the namespaces, forks S and waits for it.  It
  is S's parent, so ``os.kill(os.getppid(), 9)`` inside S can at worst kill C (outside a pid
  namespace), never J or P; S then dies by its own parent-death signal and the tests it had not
  answered score 0.
* **S**, the sandbox: after the isolation set-up it ``execve``\\ s a *fresh* interpreter
  (``python -I -S``, so no memory of J's job survives in it), which reads the harness's code
  (:mod:`.harness` and the modules it imports, see :mod:`.bootstrap`) and the program from a pipe
  and runs the program.  For stdio tests S forks one **R** per test.

How verdicts are kept out of the program's reach
------------------------------------------------
The program never judges itself.  S only ever *answers questions*: "call ``f`` with these
arguments and send me the return value", "run the program on this stdin and send me its
stdout".  Return values travel as JSON of plain types (tagged for tuples, sets, dicts with
non-string keys, bytes, big ints...), decoded by J into genuine built-in objects, so an object
whose ``__eq__`` always returns True cannot cross the boundary.  J evaluates the assert
expressions itself, on those values, with its own untouched builtins.  Concretely:

* MBPP-style ``assert f(1, 2) == 3`` lines and HumanEval ``check(candidate)`` functions execute
  *in J*.  Names the tests use that J does not define (``f``; the HumanEval ``candidate``) are
  bound to proxies: calling one sends the arguments to S and returns what S reports.  Each
  top-level statement of ``check`` that contains an ``assert`` is one test; a test that makes no
  call into the program is not counted (HumanEval's ``assert True`` lines), or, in an assert list,
  reported as ``invalid_test``.  Helpers defined in the HumanEval prompt (``poly``,
  ``encode_cyclic``) are J's own trusted copies, so a program cannot redefine the yardstick.
* stdio expected outputs stay in J; S sends R's stdout, J compares.
* Whatever S writes on its channel is, at worst, a claimed return value.  Forging the channel
  (writing frames to inherited fds, pre-sending answers, patching the harness) therefore cannot
  achieve more than computing the right values would; malformed frames are an ``error``.
  ``SystemExit``, ``os._exit``, a killed harness or a timeout make the affected tests fail.
* Expected values are never written into S's environment, arguments or file system, and J, P,
  and C are invisible to S (pid namespace + fresh ``/proc``), or at least not readable by it
  (different uid / non-dumpable).

What is isolated, and how (``protections`` in every result says what was active)
-------------------------------------------------------------------------------
* **Namespaces** (``unshare``): pid, mount, network, IPC, UTS.  As root directly; otherwise
  inside a new *user* namespace (which needs no privileges where the kernel allows unprivileged
  user namespaces).  With a pid namespace S is pid 1: killing S kills every process the program
  started, and the program cannot see or signal anything outside.  The network namespace has only
  a loopback device that is down: no network at all.
* **File system** (mount namespace): an *allowlist* view (:mod:`.view`).  S gets a new, empty
  root into which only the interpreter, its standard library, the shared libraries they load,
  and the packages ``Limits.site_packages`` names are bind-mounted read-only; besides them a
  private size-capped tmpfs ``/tmp`` (the working directory and ``$HOME``), a private
  ``/dev/shm``, the device nodes ``/dev/null``, ``zero``, ``full``, ``random``, ``urandom``, and
  a fresh ``/proc``.  S moves into it with ``pivot_root`` and detaches the host's tree, so no
  input file, checkpoint or sibling submission is reachable wherever it lies.  Where it is
  refused the fallback is the host read-only with the home directories, ``/run``,
  ``/var/tmp``, ``/mnt``, ``/media``, ``/srv``, the caller's working directory, the virtual
  environment and ``Limits.hide_paths`` hidden (``filesystem_view: "host-readonly"``).  Files
  the program writes vanish with the namespace.
* **Memory** (:mod:`.cgroups`): one memory cgroup per sandbox (v2, or the v1 ``memory``
  controller) limits all of the program's processes and its memfd / tmpfs pages together to
  ``memory_mb``; an OOM kill in it is the verdict ``memory``.  ``memory_scope`` reports
  ``"all-processes"`` or, without a writable cgroup, ``"per-process"`` (RLIMIT_AS per process,
  RLIMIT_NPROC, RLIMIT_FSIZE on every file and memfd, the tmpfs sizes).
* **The judge's own limits**: J runs test code on values the program returned, so those values
  are bounded before anything is rebuilt (:mod:`.protocol`: element count, nesting, integer
  bits, decimal exponents; ranges count their length; generators and other iterators are
  materialised in S, under the program's limits); over a bound is the verdict
  ``output_limit``.  J itself runs under an address-space and CPU limit
  (``judge_memory_mb``; ``judge_limits`` in the report), each test statement under a CPU clock,
  and its result goes to P on a private descriptor (a test's ``print`` cannot corrupt it).
* **Exceptions** from the program reach the tests as classes of the same name deriving from
  the same built-in exceptions (``except ValueError`` catches a ``ValueError`` subclass), with
  the message only; ``StopIteration`` arrives as a ``RuntimeError`` (as PEP 479 does for
  generators) so that it cannot end a test's ``all(map(...))`` early.
* **Privileges**: when root, S switches to a fresh random uid/gid (so ``RLIMIT_NPROC`` binds and
  nothing root-owned is writable or signalable); ``PR_SET_NO_NEW_PRIVS``; ``nosuid`` mounts.
* **Resources** (``setrlimit``): address space (memory), CPU seconds, file size, process
  count, open files, no core dumps.  J enforces wall-time limits per test and for the whole
  program, and a cap on the size of what S sends back (output / return value).
* **Fallbacks**: without namespaces (``Limits.isolation="none"`` or where ``unshare`` is
  refused) only the rlimits, the process-group kill, the uid switch (when root and the
  interpreter is readable by the new uid), the non-dumpable judge and a private temporary
  working directory remain: the program can then read the host's world-readable files, write to
  world-writable directories, use the network, and (same uid, no pid namespace) signal the
  caller.  ``sandbox_capabilities()`` reports which mode a host gets.

Not isolated, even in the best mode: CPU and memory *bandwidth*, the kernel attack surface (no
seccomp filter), and timing side channels.  Without a writable memory cgroup, memory is limited
per process (``RLIMIT_AS``), so a program may hold up to ``max_processes`` x ``memory_mb``.

Modules
-------
* :mod:`.limits`: :class:`Limits` and the verdict ``STATUSES``.
* :mod:`.caller` (P): :func:`run_job` starts one judge per program; :func:`sandbox_capabilities`.
* :mod:`.judge` (J): the judge's entry point and its driver of one program's sandbox;
  :mod:`.modes`: the three kinds of tests; :mod:`.failures`: failures and their statuses.
* :mod:`.supervisor` (J, C): one sandbox seen from J, and the intermediary that creates it;
  :mod:`.cgroups` (J, C): the sandbox's memory cgroup;
  :mod:`.view` (P, S before ``execve``): the allowlist file system view;
  :mod:`.isolation` (S before ``execve``): the fallback view, rlimits, privileges, uids;
  :mod:`.syscalls`: the libc calls (namespaces, mounts, prctl).
* :mod:`.bootstrap`: how S receives the harness; :mod:`.harness` (S after ``execve``);
  :mod:`.protocol`: frames and the value codec; :mod:`.procs`: process helpers.  These last
  three are the harness, shipped to S as code: standard library only.
"""

from __future__ import annotations

from .caller import run_job, sandbox_capabilities
from .limits import STATUSES, Limits

__all__ = ["Limits", "run_job", "sandbox_capabilities", "STATUSES"]
