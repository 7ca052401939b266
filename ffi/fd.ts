/**
 * Owned file descriptors: one owner, closed exactly once, CLOEXEC by default.
 * @module
 */
import { cstr as cstrOf, libc } from "./_libc.ts";
import { STAT } from "./_layout.ts";
import { check, checkAgain, Errno, ErrnoError } from "./errno.ts";

export const O_CLOEXEC = 0o2000000;
export const O_NONBLOCK = 0o4000;
const F_GETFD = 1;
const F_SETFD = 2;
const F_GETFL = 3;
const F_SETFL = 4;
const F_DUPFD_CLOEXEC = 1030;
const FD_CLOEXEC = 1;

let openCount = 0;

/**
 * A file descriptor with exactly one owner. `close()` is idempotent; using a closed fd throws.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const [r, w] = pipe(); // two OwnedFds; an inherited fd: OwnedFd.unsafeAdopt(3, "--fd 3")
 * w.write(new Uint8Array([42]));
 * w.close();
 * w.close(); // idempotent
 * const buf = new Uint8Array(1);
 * assert.equal(r.read(buf), 1);
 * assert.equal(r.read(buf), 0); // end of file: the write end is closed
 * r.close();
 * assert.throws(() => r.read(buf), { code: "EBADF" }); // never the number's next owner
 * ```
 */
export class OwnedFd {
  #fd: number;
  /** What this fd is, for error messages and plans ("memfd ivshmem", "socket /tmp/x"). */
  readonly label: string;

  private constructor(fd: number, label: string) {
    this.#fd = fd;
    this.label = label;
    openCount++;
  }

  /** Takes ownership of a raw fd number (from a syscall, or inherited). */
  static unsafeAdopt(fd: number, label = "fd"): OwnedFd {
    if (!Number.isInteger(fd) || fd < 0) throw new RangeError(`not an fd: ${fd}`);
    return new OwnedFd(fd, label);
  }

  /** The raw number. Only ffi/ and diagnostics may use it. */
  get unsafeFd(): number {
    if (this.#fd < 0) throw new ErrnoError("use", Errno.EBADF, `of closed fd (${this.label})`);
    return this.#fd;
  }

  /** Whether close() has run. */
  get closed(): boolean {
    return this.#fd < 0;
  }

  /** Closes the fd once; later calls do nothing. */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    openCount--;
    // close() always releases the descriptor on Linux, even when it reports EINTR/EIO.
    libc.close(fd);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** Gives up ownership and returns the raw number (for handing to exec). */
  unsafeRelease(): number {
    const fd = this.unsafeFd;
    this.#fd = -1;
    openCount--;
    return fd;
  }

  /** A new owned duplicate (CLOEXEC) at the lowest number >= `min`. */
  dup(min = 0, label = this.label): OwnedFd {
    return new OwnedFd(
      check("fcntl(F_DUPFD_CLOEXEC)", libc.fcntl(this.unsafeFd, F_DUPFD_CLOEXEC, min)),
      label,
    );
  }

  /** Sets or clears O_NONBLOCK. */
  setNonBlocking(on: boolean): void {
    const fl = check("fcntl(F_GETFL)", libc.fcntl(this.unsafeFd, F_GETFL, 0));
    check("fcntl(F_SETFL)", libc.fcntl(this.unsafeFd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK));
  }

  /** Sets or clears FD_CLOEXEC. */
  setCloseOnExec(on: boolean): void {
    const fl = check("fcntl(F_GETFD)", libc.fcntl(this.unsafeFd, F_GETFD, 0));
    check("fcntl(F_SETFD)", libc.fcntl(this.unsafeFd, F_SETFD, on ? fl | FD_CLOEXEC : fl & ~FD_CLOEXEC));
  }

  /** Whether FD_CLOEXEC is set. */
  get closeOnExec(): boolean {
    return (check("fcntl(F_GETFD)", libc.fcntl(this.unsafeFd, F_GETFD, 0)) & FD_CLOEXEC) !== 0;
  }

  /** read(2) into `buf`; null on EAGAIN, 0 at end of file. */
  read(buf: Uint8Array<ArrayBuffer>): number | null {
    const n = checkAgain("read", libc.read(this.unsafeFd, buf, BigInt(buf.byteLength)), this.label);
    return n === null ? null : Number(n);
  }

  /** write(2) from `buf`; null on EAGAIN. */
  write(buf: Uint8Array<ArrayBuffer>): number | null {
    const n = checkAgain("write", libc.write(this.unsafeFd, buf, BigInt(buf.byteLength)), this.label);
    return n === null ? null : Number(n);
  }

  toString(): string {
    return `OwnedFd(${this.#fd}, ${this.label})`;
  }
}

/** How many OwnedFd objects are open in this process (for leak checks in tests). */
export function ownedFdCount(): number {
  return openCount;
}

/** Opens a path (O_CLOEXEC always added). */
export function openPath(path: string, flags: number, mode = 0o644): OwnedFd {
  const fd = check("open", libc.open(cstrOf(path), flags | O_CLOEXEC, mode), path);
  return OwnedFd.unsafeAdopt(fd, path);
}

/** open(2) flag values. */
export const OpenFlags = {
  O_RDONLY: 0,
  O_WRONLY: 1,
  O_RDWR: 2,
  O_CREAT: 0o100,
  O_EXCL: 0o200,
  O_TRUNC: 0o1000,
  O_APPEND: 0o2000,
  O_NONBLOCK,
  O_DIRECT: 0o40000,
  O_CLOEXEC,
} as const;

/** The fd numbers open in this process, from /proc/self/fd (for tests and leak checks). */
export function listOpenFds(): number[] {
  const names: number[] = [];
  for (const e of Deno.readDirSync("/proc/self/fd")) names.push(Number(e.name));
  // The directory listing itself used an fd that is closed by now: keep only fds still open.
  const out = names.filter((n) => {
    try {
      Deno.readLinkSync(`/proc/self/fd/${n}`);
      return true;
    } catch {
      return false;
    }
  });
  return out.sort((a, b) => a - b);
}

/** pipe2(2) with O_CLOEXEC (and O_NONBLOCK if asked): [read end, write end]. */
export function pipe(options: { nonBlocking?: boolean } = {}): [OwnedFd, OwnedFd] {
  const fds = new Int32Array(2);
  check("pipe2", libc.pipe2(new Uint8Array(fds.buffer), O_CLOEXEC | (options.nonBlocking ? O_NONBLOCK : 0)));
  return [OwnedFd.unsafeAdopt(fds[0], "pipe (read end)"), OwnedFd.unsafeAdopt(fds[1], "pipe (write end)")];
}

const S_IFMT = 0o170000;
const FILE_TYPES: Readonly<Record<number, string>> = {
  0o100000: "regular file",
  0o040000: "directory",
  0o020000: "character device",
  0o060000: "block device",
  0o010000: "fifo",
  0o140000: "socket",
  0o120000: "symbolic link",
};

/**
 * What kind of file `fd` is, for checking what a peer handed over before using it: "eventfd" (or
 * another anon inode's name: "timerfd", "signalfd", ...), "socket", "pipe", "regular file" (memfds,
 * /dev/shm and hugetlbfs files too), "directory", "character device", "block device", "fifo".
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { EventFd } from "./eventfd.ts";
 *
 * using ev = new EventFd();
 * assert.equal(fdKind(ev.fd), "eventfd");
 * const [r, w] = pipe();
 * assert.equal(fdKind(r), "pipe");
 * r.close();
 * w.close();
 * ```
 */
export function fdKind(fd: OwnedFd): string {
  let link = "";
  try {
    link = Deno.readLinkSync(`/proc/self/fd/${fd.unsafeFd}`);
  } catch { /* no /proc: fall back to the type bits */ }
  const anon = /^anon_inode:\[?([^\]]+)\]?$/.exec(link);
  if (anon) return anon[1];
  if (link.startsWith("pipe:")) return "pipe";
  if (link.startsWith("socket:")) return "socket";
  const st = new Uint8Array(STAT.size);
  check("fstat", libc.fstat(fd.unsafeFd, st), fd.label);
  const mode = new DataView(st.buffer).getUint32(STAT.mode, true);
  return FILE_TYPES[mode & S_IFMT] ?? `file of type 0o${(mode & S_IFMT).toString(8)}`;
}
