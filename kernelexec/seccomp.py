"""The seccomp profile applied to every sandbox by default.

An allowlist, tighter than Docker's default: every syscall of the native ABI
that a Python kernel may need is allowed; everything in :data:`DENIED` (each
with the reason) and every syscall not listed is refused with EPERM, and
32-bit compat ABIs are refused outright (a frequent source of kernel bugs).
A few syscalls are allowed only with safe arguments (``clone`` without
namespace flags, ``socket`` for unix, inet and netlink families only,
``personality`` for the ordinary personas). ``clone3`` answers ENOSYS so
that the C library falls back to the filtered ``clone``.

``docs/security.md`` lists what this removes compared with Docker's default.
"""

from __future__ import annotations

import json
from functools import lru_cache

#: Syscalls refused, and why. Docker's default profile refuses most of these
#: too; the ones marked (+) it allows and we do not.
DENIED: dict[str, str] = {
    "ptrace": "(+) inspect or control other processes; used in many escapes",
    "process_vm_readv": "(+) read another process's memory",
    "process_vm_writev": "(+) write another process's memory",
    "pidfd_getfd": "(+) steal file descriptors from another process",
    "kcmp": "(+) compare kernel objects across processes (ASLR/info leak)",
    "process_madvise": "(+) act on another process's memory",
    "process_mrelease": "(+) act on another process's memory",
    "userfaultfd": "(+) widely used to win kernel race conditions",
    "io_uring_setup": "io_uring: a large, bug-prone kernel surface that also bypasses seccomp per operation",
    "io_uring_enter": "io_uring",
    "io_uring_register": "io_uring",
    "bpf": "load programs into the kernel",
    "perf_event_open": "kernel profiling interface; frequent privilege-escalation bugs",
    "keyctl": "kernel keyrings are not namespaced",
    "add_key": "kernel keyrings",
    "request_key": "kernel keyrings",
    "unshare": "new namespaces (user namespaces expose root-only kernel code)",
    "setns": "enter other namespaces",
    "mount": "filesystems", "umount2": "filesystems", "pivot_root": "filesystems",
    "chroot": "(+) filesystems (needs a capability we drop anyway)",
    "fsopen": "new mount API", "fsconfig": "new mount API", "fsmount": "new mount API",
    "fspick": "new mount API", "open_tree": "new mount API", "move_mount": "new mount API",
    "mount_setattr": "new mount API",
    "open_by_handle_at": "open files by handle, bypassing path checks (the 'shocker' escape)",
    "name_to_handle_at": "(+) pairs with open_by_handle_at",
    "init_module": "kernel modules", "finit_module": "kernel modules", "delete_module": "kernel modules",
    "create_module": "kernel modules", "query_module": "kernel modules", "get_kernel_syms": "kernel modules",
    "kexec_load": "load a new kernel", "kexec_file_load": "load a new kernel",
    "reboot": "reboot the host",
    "swapon": "swap", "swapoff": "swap",
    "acct": "process accounting",
    "quotactl": "quotas", "quotactl_fd": "quotas",
    "settimeofday": "the clock is not namespaced", "clock_settime": "the clock", "clock_adjtime": "the clock",
    "adjtimex": "(+) the clock",
    "sethostname": "(+) not needed in a sandbox", "setdomainname": "(+) not needed in a sandbox",
    "syslog": "kernel log", "vhangup": "terminals",
    "iopl": "I/O port access", "ioperm": "I/O port access", "modify_ldt": "(+) old x86 segment tricks",
    "mbind": "NUMA policy", "set_mempolicy": "NUMA policy", "get_mempolicy": "NUMA policy",
    "set_mempolicy_home_node": "NUMA policy", "move_pages": "NUMA pages", "migrate_pages": "NUMA pages",
    "lookup_dcookie": "profiling", "nfsservctl": "obsolete", "uselib": "obsolete", "ustat": "obsolete",
    "sysfs": "obsolete", "_sysctl": "obsolete", "afs_syscall": "unimplemented", "tuxcall": "unimplemented",
    "security": "unimplemented", "vserver": "unimplemented", "putpmsg": "unimplemented",
    "getpmsg": "unimplemented", "epoll_ctl_old": "unimplemented", "epoll_wait_old": "unimplemented",
    "fanotify_init": "filesystem-wide monitoring", "memfd_secret": "(+) memory hidden from the kernel",
    "remap_file_pages": "(+) deprecated, past bugs",
}

#: Allowed only with the argument rules below.
FILTERED = ("clone", "clone3", "socket", "personality")

# Native x86_64 syscalls (Linux 6.1 headers) minus DENIED and FILTERED.
_NATIVE = """
accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown clock_getres clock_gettime
clock_nanosleep close close_range connect copy_file_range creat dup dup2 dup3 epoll_create epoll_create1
epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2 execve execveat exit exit_group faccessat
faccessat2 fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat fchown fchownat fcntl fdatasync fgetxattr
flistxattr flock fork fremovexattr fsetxattr fstat fstatfs fsync ftruncate futex futex_waitv futimesat
get_robust_list get_thread_area getcpu getcwd getdents getdents64 getegid geteuid getgid getgroups getitimer
getpeername getpgid getpgrp getpid getppid getpriority getrandom getresgid getresuid getrlimit getrusage getsid
getsockname getsockopt gettid gettimeofday getuid getxattr inotify_add_watch inotify_init inotify_init1
inotify_rm_watch io_cancel io_destroy io_getevents io_pgetevents io_setup io_submit ioctl ioprio_get ioprio_set
kill landlock_add_rule landlock_create_ruleset landlock_restrict_self lchown lgetxattr link linkat listen
listxattr llistxattr lremovexattr lseek lsetxattr lstat madvise membarrier memfd_create mincore mkdir mkdirat
mknod mknodat mlock mlock2 mlockall mmap mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend
mq_unlink mremap msgctl msgget msgrcv msgsnd msync munlock munlockall munmap nanosleep newfstatat open openat
openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll prctl
pread64 preadv preadv2 prlimit64 pselect6 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv
recvfrom recvmmsg recvmsg removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction
rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo
sched_get_priority_max sched_get_priority_min sched_getaffinity sched_getattr sched_getparam sched_getscheduler
sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp
select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto set_robust_list set_thread_area
set_tid_address setfsgid setfsuid setgid setgroups setitimer setpgid setpriority setregid setresgid setresuid
setreuid setrlimit setsid setsockopt setuid setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd
signalfd4 socketpair splice stat statfs statx symlink symlinkat sync sync_file_range syncfs sysinfo tee tgkill
time timer_create timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create timerfd_gettime
timerfd_settime times tkill truncate umask uname unlink unlinkat utime utimensat utimes vfork vmsplice wait4
waitid write writev
"""

ALLOWED: tuple[str, ...] = tuple(sorted(set(_NATIVE.split())))

#: clone flags that create namespaces: CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
_CLONE_NS_MASK = 0x7E020000
#: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK (getaddrinfo asks netlink for local addresses)
SOCKET_FAMILIES = (1, 2, 10, 16)
#: PER_LINUX, PER_LINUX32, UNAME26, PER_LINUX32|UNAME26, and the query value
_PERSONAS = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


@lru_cache(maxsize=1)
def profile() -> dict[str, object]:
    rules: list[dict[str, object]] = [{"names": list(ALLOWED), "action": "SCMP_ACT_ALLOW"}]
    rules.append({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                  "args": [{"index": 0, "value": _CLONE_NS_MASK, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]})
    rules.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38})  # ENOSYS: use clone
    for family in SOCKET_FAMILIES:
        rules.append({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 0, "value": family, "op": "SCMP_CMP_EQ"}]})
    for persona in _PERSONAS:
        rules.append({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                      "args": [{"index": 0, "value": persona, "op": "SCMP_CMP_EQ"}]})
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        # native ABIs only: 32-bit compat syscalls from a 64-bit process are refused
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": []},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []},
        ],
        "syscalls": rules,
    }


def profile_json() -> str:
    """The profile as Docker's API takes it (``SecurityOpt: seccomp=<json>``)."""
    return json.dumps(profile(), separators=(",", ":"))
