/**
 * errno names and the one checker every syscall result goes through.
 * @module
 */
import { libc } from "./_libc.ts";

/** Linux x86_64 errno numbers to names. */
export const ERRNO_NAMES: Readonly<Record<number, string>> = {
  1: "EPERM",
  2: "ENOENT",
  3: "ESRCH",
  4: "EINTR",
  5: "EIO",
  6: "ENXIO",
  7: "E2BIG",
  8: "ENOEXEC",
  9: "EBADF",
  10: "ECHILD",
  11: "EAGAIN",
  12: "ENOMEM",
  13: "EACCES",
  14: "EFAULT",
  15: "ENOTBLK",
  16: "EBUSY",
  17: "EEXIST",
  18: "EXDEV",
  19: "ENODEV",
  20: "ENOTDIR",
  21: "EISDIR",
  22: "EINVAL",
  23: "ENFILE",
  24: "EMFILE",
  25: "ENOTTY",
  26: "ETXTBSY",
  27: "EFBIG",
  28: "ENOSPC",
  29: "ESPIPE",
  30: "EROFS",
  31: "EMLINK",
  32: "EPIPE",
  33: "EDOM",
  34: "ERANGE",
  35: "EDEADLK",
  36: "ENAMETOOLONG",
  37: "ENOLCK",
  38: "ENOSYS",
  39: "ENOTEMPTY",
  40: "ELOOP",
  42: "ENOMSG",
  61: "ENODATA",
  62: "ETIME",
  71: "EPROTO",
  74: "EBADMSG",
  75: "EOVERFLOW",
  84: "EILSEQ",
  88: "ENOTSOCK",
  89: "EDESTADDRREQ",
  90: "EMSGSIZE",
  91: "EPROTOTYPE",
  92: "ENOPROTOOPT",
  93: "EPROTONOSUPPORT",
  95: "EOPNOTSUPP",
  97: "EAFNOSUPPORT",
  98: "EADDRINUSE",
  99: "EADDRNOTAVAIL",
  100: "ENETDOWN",
  101: "ENETUNREACH",
  103: "ECONNABORTED",
  104: "ECONNRESET",
  105: "ENOBUFS",
  106: "EISCONN",
  107: "ENOTCONN",
  110: "ETIMEDOUT",
  111: "ECONNREFUSED",
  113: "EHOSTUNREACH",
  114: "EALREADY",
  115: "EINPROGRESS",
  116: "ESTALE",
  122: "EDQUOT",
  125: "ECANCELED",
};

/** Common errno numbers by name. */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  ECHILD: 10,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  EMFILE: 24,
  ENOSPC: 28,
  EROFS: 30,
  EPIPE: 32,
  ENOSYS: 38,
  EOPNOTSUPP: 95,
  EADDRINUSE: 98,
  ECONNRESET: 104,
  ENOTCONN: 107,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  EINPROGRESS: 115,
} as const;

/** The name of an errno number ("EAGAIN"), or "E<n>" when unknown. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `E${errno}`;
}

/** A failed system call: carries the call, errno and its name. */
export class ErrnoError extends Error {
  /** The libc function or syscall that failed. */
  readonly syscall: string;
  /** The errno number. */
  readonly errno: number;
  /** The errno name, e.g. "EAGAIN". */
  readonly code: string;

  constructor(syscall: string, errno: number, detail?: string) {
    const code = errnoName(errno);
    super(`${syscall}${detail ? ` ${detail}` : ""}: ${code} (errno ${errno})`);
    this.name = "ErrnoError";
    this.syscall = syscall;
    this.errno = errno;
    this.code = code;
  }
}

const errnoView = new Deno.UnsafePointerView(libc.__errno_location()!);

/** The calling thread's errno. Read it right after a synchronous call. */
export function lastErrno(): number {
  return errnoView.getInt32(0);
}

/**
 * Throws an ErrnoError when `result` is -1 (reading errno at once), else returns it.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { libc } from "./_libc.ts";
 * import { OwnedFd } from "./fd.ts";
 *
 * const sock = OwnedFd.unsafeAdopt(check("socket", libc.socket(1, 1, 0)), "socket"); // AF_UNIX, SOCK_STREAM
 * sock.close();
 * assert.throws(() => check("close", libc.close(-1), "fd -1"), {
 *   name: "ErrnoError",
 *   message: "close fd -1: EBADF (errno 9)",
 *   code: "EBADF",
 * });
 * ```
 */
export function check<T extends number | bigint>(syscall: string, result: T, detail?: string): T {
  if (result === -1 || result === -1n) throw new ErrnoError(syscall, lastErrno(), detail);
  return result;
}

/**
 * Like check(), but returns null when errno is EAGAIN (the nonblocking "not now").
 * EINTR is retried by the caller's loop: it is reported as null too.
 */
export function checkAgain<T extends number | bigint>(syscall: string, result: T, detail?: string): T | null {
  if (result === -1 || result === -1n) {
    const e = lastErrno();
    if (e === Errno.EAGAIN || e === Errno.EINTR) return null;
    throw new ErrnoError(syscall, e, detail);
  }
  return result;
}

/** For calls that return a positive errno instead of setting it (posix_spawn*). */
export function checkReturn(syscall: string, rc: number, detail?: string): void {
  if (rc !== 0) throw new ErrnoError(syscall, rc, detail);
}
