#!/usr/bin/python3
"""Runs a command under the system call filter of a systemd unit, where no systemd runs it.

    deploy/run-filtered.py [--kill] UNIT -- COMMAND [ARG...]

Reads the unit's SystemCallFilter= lines (an allow list, then ~ deny lists, as systemd
combines them), SystemCallErrorNumber=, SystemCallArchitectures=native,
RestrictAddressFamilies= and MemoryDenyWriteExecute=, expands the @groups with
`systemd-analyze syscall-filter` (the same tables systemd uses), loads the filter with
libseccomp (Debian's python3-seccomp; it also sets no_new_privs) and execs COMMAND.

With --kill a call outside the filter kills the process (SIGSYS) instead of failing with the
unit's errno: a test then sees every denied call, not only those the program notices.
Capabilities and the user are not this script's business: run it under `setpriv`.
"""

import errno
import os
import socket
import subprocess
import sys

import seccomp


def unit_values(path, key):
    """Every value of `key=` in the unit's [Service] section, in order."""
    values = []
    section = None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
                continue
            if section == "[Service]" and line.startswith(key + "="):
                values.append(line[len(key) + 1 :].strip())
    return values


def expand(name, seen=None):
    """The system calls of `name`: a call, or an @group (recursively)."""
    if not name.startswith("@"):
        return {name}
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= expand(item, seen)
    return calls


def allowed_calls(unit):
    """The unit's allow list minus its deny lists, as systemd combines SystemCallFilter=."""
    allowed = None
    for value in unit_values(unit, "SystemCallFilter"):
        deny = value.startswith("~")
        names = value.lstrip("~").split()
        calls = set().union(*(expand(n) for n in names)) if names else set()
        if deny:
            if allowed is None:
                sys.exit(f"{unit}: a deny list alone is not handled here")
            allowed -= calls
        else:
            allowed = calls if allowed is None else allowed | calls
    if allowed is None:
        sys.exit(f"{unit}: no SystemCallFilter=")
    return allowed


def main():
    args = sys.argv[1:]
    kill = False
    if args and args[0] == "--kill":
        kill, args = True, args[1:]
    if len(args) < 3 or args[1] != "--":
        sys.exit(__doc__)
    unit, command = args[0], args[2:]

    error_name = (unit_values(unit, "SystemCallErrorNumber") or ["EPERM"])[-1]
    denied = seccomp.KILL_PROCESS if kill else seccomp.ERRNO(getattr(errno, error_name))
    f = seccomp.SyscallFilter(defaction=denied)
    # SystemCallArchitectures=native: the filter holds only the native architecture, and a
    # call made through another ABI (x32, i386 on amd64) is denied.
    if unit_values(unit, "SystemCallArchitectures") != ["native"]:
        sys.exit(f"{unit}: expected SystemCallArchitectures=native")

    calls = allowed_calls(unit)
    conditional = set()
    families = [v for line in unit_values(unit, "RestrictAddressFamilies") for v in line.split()]
    if families:
        conditional.add("socket")
        for fam in families:
            f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, int(getattr(socket, fam))))
    mdwe = unit_values(unit, "MemoryDenyWriteExecute") == ["yes"]
    if mdwe:
        w, x = 0x2, 0x4  # PROT_WRITE, PROT_EXEC
        for call in ("mmap", "mprotect", "pkey_mprotect"):
            if call not in calls:
                continue
            conditional.add(call)
            arg = 2
            if call == "mmap":
                # Writable or executable, never both.
                for ok in (0, w, x):
                    f.add_rule(seccomp.ALLOW, call, seccomp.Arg(arg, seccomp.MASKED_EQ, w | x, ok))
            else:
                f.add_rule(seccomp.ALLOW, call, seccomp.Arg(arg, seccomp.MASKED_EQ, x, 0))
        conditional.add("shmat")  # systemd denies shmat with SHM_EXEC too; not needed here
    unknown = []
    for call in sorted(calls - conditional):
        try:
            f.add_rule(seccomp.ALLOW, call)
        except (RuntimeError, ValueError, OSError):
            unknown.append(call)  # not a call of this kernel/architecture: systemd skips it too
    print(
        f"run-filtered: {len(calls) - len(unknown)} calls allowed from {unit}"
        f" ({'kill' if kill else error_name} on others), families {families or 'any'},"
        f" MemoryDenyWriteExecute={'yes' if mdwe else 'no'}",
        file=sys.stderr,
    )
    f.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
