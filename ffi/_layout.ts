/**
 * Struct sizes and offsets for Linux x86_64 glibc, checked in layout_test.ts.
 * Private to ffi/.
 * @module
 */

/** struct sockaddr_un { sa_family_t sun_family; char sun_path[108]; } */
export const SOCKADDR_UN = { size: 110, family: 0, path: 2, pathMax: 108 } as const;
/** struct iovec { void *iov_base; size_t iov_len; } */
export const IOVEC = { size: 16, base: 0, len: 8 } as const;
/** struct msghdr (with the padding after msg_namelen). */
export const MSGHDR = {
  size: 56,
  name: 0,
  namelen: 8,
  iov: 16,
  iovlen: 24,
  control: 32,
  controllen: 40,
  flags: 48,
} as const;
/** struct cmsghdr { size_t cmsg_len; int cmsg_level; int cmsg_type; unsigned char data[]; } */
export const CMSGHDR = { size: 16, len: 0, level: 8, type: 12, data: 16 } as const;
/** CMSG_SPACE(n): header plus data rounded up to 8. */
export function cmsgSpace(n: number): number {
  return CMSGHDR.size + ((n + 7) & ~7);
}
/** CMSG_LEN(n). */
export function cmsgLen(n: number): number {
  return CMSGHDR.size + n;
}
/** struct epoll_event is packed on x86_64: { uint32_t events; uint64_t data; } */
export const EPOLL_EVENT = { size: 12, events: 0, data: 4 } as const;
/** struct rlimit { rlim_t cur, max; } */
export const RLIMIT = { size: 16, cur: 0, max: 8 } as const;
/** struct stat (x86_64). */
export const STAT = { size: 144, mode: 24, size_: 48 } as const;
/** siginfo_t (128 bytes); for SIGCHLD: si_pid, si_status, si_code. */
export const SIGINFO = { size: 128, signo: 0, code: 8, pid: 16, status: 24 } as const;
/** Opaque glibc types: posix_spawn_file_actions_t, posix_spawnattr_t, sigset_t. */
export const OPAQUE = { fileActions: 80, spawnAttr: 336, sigset: 128 } as const;

/** Socket constants. */
export const AF_UNIX = 1;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_SEQPACKET = 5;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SCM_RIGHTS = 1;
export const MSG_CTRUNC = 0x8;
export const MSG_TRUNC = 0x20;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CMSG_CLOEXEC = 0x40000000;
