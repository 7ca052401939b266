/**
 * UNIX-domain sockets: socketpair, listen/accept/connect on a path, and
 * sendmsg/recvmsg carrying bytes plus fds (SCM_RIGHTS) through preallocated buffers.
 * @module
 */
import { addressOf, cstr, libc } from "./_libc.ts";
import {
  AF_UNIX,
  CMSGHDR,
  cmsgLen,
  cmsgSpace,
  IOVEC,
  MSG_CMSG_CLOEXEC,
  MSG_CTRUNC,
  MSG_NOSIGNAL,
  MSGHDR,
  SCM_RIGHTS,
  SOCK_CLOEXEC,
  SOCK_DGRAM,
  SOCK_NONBLOCK,
  SOCK_STREAM,
  SOCKADDR_UN,
  SOL_SOCKET,
} from "./_layout.ts";
import { check, checkAgain, Errno, ErrnoError, lastErrno } from "./errno.ts";
import { OwnedFd } from "./fd.ts";

/** Most fds one message may carry (the kernel's SCM_MAX_FD is 253). */
export const MAX_FDS_PER_MESSAGE = 253;

/** Options for sockets made here. */
export interface SocketOptions {
  /** O_NONBLOCK on the socket (default true: everything goes through the reactor). */
  nonBlocking?: boolean;
  /** Most fds one recvMsg accepts (default 8). */
  maxFds?: number;
}

function sockaddrUn(path: string): Uint8Array<ArrayBuffer> {
  const p = cstr(path);
  if (p.length > SOCKADDR_UN.pathMax) {
    throw new ErrnoError(
      "bind/connect",
      36,
      `${path}: socket path longer than ${SOCKADDR_UN.pathMax - 1} bytes`,
    );
  }
  const sa = new Uint8Array(SOCKADDR_UN.size);
  new DataView(sa.buffer).setUint16(SOCKADDR_UN.family, AF_UNIX, true);
  sa.set(p, SOCKADDR_UN.path);
  return sa;
}

/** What recvMsg got: byte count (0 = peer closed) and the fds that came with it (now yours). */
export interface Received {
  bytes: number;
  fds: OwnedFd[];
}

/**
 * A connected UNIX stream socket that can carry fds.
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { fstat, ftruncate, memfdCreate } from "./memory.ts";
 *
 * const [a, b] = socketPair();
 * using memfd = memfdCreate("shared");
 * ftruncate(memfd, 4096);
 * a.sendMsg(new Uint8Array([1]), [memfd]); // the fd stays ours; the peer gets its own
 * const got = b.recvMsg(new Uint8Array(8)); // { bytes: 1, fds: [OwnedFd] }; null when nothing is there
 * assert.equal(got?.bytes, 1);
 * using received = got!.fds[0]; // received fds are ours to close
 * assert.equal(fstat(received).size, 4096);
 * a.close();
 * b.close();
 * ```
 */
export class UnixSocket {
  readonly fd: OwnedFd;
  readonly #maxFds: number;
  readonly #msg = new Uint8Array(MSGHDR.size);
  readonly #msgView = new DataView(this.#msg.buffer);
  readonly #iov = new Uint8Array(IOVEC.size);
  readonly #iovView = new DataView(this.#iov.buffer);
  readonly #cmsg: Uint8Array<ArrayBuffer>;
  readonly #cmsgView: DataView;

  constructor(fd: OwnedFd, options: SocketOptions = {}) {
    this.fd = fd;
    this.#maxFds = Math.min(options.maxFds ?? 8, MAX_FDS_PER_MESSAGE);
    this.#cmsg = new Uint8Array(cmsgSpace(4 * Math.max(this.#maxFds, 1)));
    this.#cmsgView = new DataView(this.#cmsg.buffer);
    this.#msgView.setBigUint64(MSGHDR.iov, addressOf(this.#iov), true);
    this.#msgView.setBigUint64(MSGHDR.iovlen, 1n, true);
  }

  #prepare(data: Uint8Array<ArrayBuffer>, controlLen: number): void {
    this.#iovView.setBigUint64(IOVEC.base, addressOf(data), true);
    this.#iovView.setBigUint64(IOVEC.len, BigInt(data.byteLength), true);
    this.#msgView.setBigUint64(MSGHDR.control, controlLen ? addressOf(this.#cmsg) : 0n, true);
    this.#msgView.setBigUint64(MSGHDR.controllen, BigInt(controlLen), true);
    this.#msgView.setInt32(MSGHDR.flags, 0, true);
  }

  /**
   * Sends `data` with `fds` attached (the fds stay owned by the caller). Returns bytes sent,
   * or null when the socket would block (nothing was sent). Never raises SIGPIPE.
   */
  sendMsg(data: Uint8Array<ArrayBuffer>, fds: readonly OwnedFd[] = []): number | null {
    if (data.byteLength === 0 && fds.length === 0) return 0;
    if (data.byteLength === 0) {
      // A stream socket sends nothing for an empty payload, and the fds would be silently dropped.
      throw new RangeError(`sendMsg: ${fds.length} fd(s) need at least one data byte to travel with`);
    }
    if (fds.length > this.#maxFds) {
      throw new RangeError(`sendMsg: ${fds.length} fds, this socket carries at most ${this.#maxFds}`);
    }
    let controlLen = 0;
    if (fds.length > 0) {
      controlLen = cmsgSpace(4 * fds.length);
      this.#cmsgView.setBigUint64(CMSGHDR.len, BigInt(cmsgLen(4 * fds.length)), true);
      this.#cmsgView.setInt32(CMSGHDR.level, SOL_SOCKET, true);
      this.#cmsgView.setInt32(CMSGHDR.type, SCM_RIGHTS, true);
      fds.forEach((f, i) => this.#cmsgView.setInt32(CMSGHDR.data + 4 * i, f.unsafeFd, true));
    }
    // A payload is required to carry ancillary data on a stream socket.
    this.#prepare(data, controlLen);
    const n = checkAgain("sendmsg", libc.sendmsg(this.fd.unsafeFd, this.#msg, MSG_NOSIGNAL), this.fd.label);
    return n === null ? null : Number(n);
  }

  /**
   * Receives into `buf`. Returns null when nothing is ready (EAGAIN), `{bytes: 0}` when the peer
   * closed. Received fds are CLOEXEC and owned by the caller. If the control buffer was too small
   * (MSG_CTRUNC) every fd that did arrive is closed and an ErrnoError(EMSGSIZE) is thrown.
   */
  recvMsg(buf: Uint8Array<ArrayBuffer>): Received | null {
    this.#prepare(buf, this.#cmsg.byteLength);
    const r = checkAgain(
      "recvmsg",
      libc.recvmsg(this.fd.unsafeFd, this.#msg, MSG_CMSG_CLOEXEC),
      this.fd.label,
    );
    if (r === null) return null;
    const fds: OwnedFd[] = [];
    const controllen = Number(this.#msgView.getBigUint64(MSGHDR.controllen, true));
    let off = 0;
    while (off + CMSGHDR.size <= controllen) {
      const len = Number(this.#cmsgView.getBigUint64(off + CMSGHDR.len, true));
      if (len < CMSGHDR.size) break;
      const level = this.#cmsgView.getInt32(off + CMSGHDR.level, true);
      const type = this.#cmsgView.getInt32(off + CMSGHDR.type, true);
      if (level === SOL_SOCKET && type === SCM_RIGHTS) {
        const count = (len - CMSGHDR.size) >> 2;
        for (let i = 0; i < count; i++) {
          fds.push(
            OwnedFd.unsafeAdopt(this.#cmsgView.getInt32(off + CMSGHDR.data + 4 * i, true), "received fd"),
          );
        }
      }
      off += cmsgSpace(len - CMSGHDR.size);
    }
    const flags = this.#msgView.getInt32(MSGHDR.flags, true);
    if (flags & MSG_CTRUNC) {
      for (const f of fds) f.close();
      throw new ErrnoError(
        "recvmsg",
        90,
        `${this.fd.label}: more than ${this.#maxFds} fds in one message (MSG_CTRUNC)`,
      );
    }
    return { bytes: Number(r), fds };
  }

  /** shutdown(2) both directions: the peer sees end of file. */
  shutdown(): void {
    if (libc.shutdown(this.fd.unsafeFd, 2) === -1 && lastErrno() !== Errno.ENOTCONN) {
      throw new ErrnoError("shutdown", lastErrno(), this.fd.label);
    }
  }

  close(): void {
    this.fd.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** A connected pair of UNIX stream sockets (CLOEXEC; nonblocking unless told otherwise). */
export function socketPair(options: SocketOptions = {}): [UnixSocket, UnixSocket] {
  const sv = new Int32Array(2);
  const type = SOCK_STREAM | SOCK_CLOEXEC | ((options.nonBlocking ?? true) ? SOCK_NONBLOCK : 0);
  check("socketpair", libc.socketpair(AF_UNIX, type, 0, new Uint8Array(sv.buffer)));
  return [
    new UnixSocket(OwnedFd.unsafeAdopt(sv[0], "socketpair[0]"), options),
    new UnixSocket(OwnedFd.unsafeAdopt(sv[1], "socketpair[1]"), options),
  ];
}

/** Connects to a listening UNIX socket at `path`. Throws ErrnoError (ECONNREFUSED, ENOENT...). */
export function connectUnix(path: string, options: SocketOptions = {}): UnixSocket {
  const sa = sockaddrUn(path);
  const fd = OwnedFd.unsafeAdopt(
    check("socket", libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)),
    `socket ${path}`,
  );
  try {
    check("connect", libc.connect(fd.unsafeFd, sa, sa.byteLength), path);
    if (options.nonBlocking ?? true) fd.setNonBlocking(true);
  } catch (e) {
    fd.close();
    throw e;
  }
  return new UnixSocket(fd, options);
}

/** Options for listenUnix. */
export interface ListenOptions extends SocketOptions {
  /** File mode of the socket (default 0o600). */
  mode?: number;
  /** listen(2) backlog (default 128). */
  backlog?: number;
}

/**
 * Listens on a UNIX socket path. A stale socket file (nobody accepts on it) is replaced; a live
 * one is refused with EADDRINUSE naming the path.
 */
export class UnixListener {
  readonly fd: OwnedFd;
  /** The path, or null for an adopted socket whose path we do not own. */
  readonly path: string | null;
  readonly #options: SocketOptions;

  constructor(fd: OwnedFd, path: string | null, options: SocketOptions = {}) {
    this.fd = fd;
    this.path = path;
    this.#options = options;
  }

  /** Accepts one connection; null when none is pending. */
  accept(): UnixSocket | null {
    const flags = SOCK_CLOEXEC | ((this.#options.nonBlocking ?? true) ? SOCK_NONBLOCK : 0);
    const r = libc.accept4(this.fd.unsafeFd, null, null, flags);
    if (r === -1) {
      const e = lastErrno();
      // Errors of the pending connection itself are "nothing to accept now" for a server.
      if (e === Errno.EAGAIN || e === Errno.EINTR || e === 103 /* ECONNABORTED */) return null;
      throw new ErrnoError("accept4", e, this.path ?? this.fd.label);
    }
    return new UnixSocket(
      OwnedFd.unsafeAdopt(r, `connection on ${this.path ?? this.fd.label}`),
      this.#options,
    );
  }

  /** Closes the socket and unlinks its path (if we created it). */
  close(): void {
    if (this.fd.closed) return;
    this.fd.close();
    if (this.path !== null) {
      try {
        unlinkPath(this.path);
      } catch { /* already gone */ }
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** Removes a file; ENOENT is not an error. */
export function unlinkPath(path: string): void {
  if (libc.unlink(cstr(path)) === -1 && lastErrno() !== Errno.ENOENT) {
    throw new ErrnoError("unlink", lastErrno(), path);
  }
}

/** Creates, binds and listens on `path`, replacing a stale socket file. */
export function listenUnix(path: string, options: ListenOptions = {}): UnixListener {
  const sa = sockaddrUn(path);
  const fd = OwnedFd.unsafeAdopt(
    check("socket", libc.socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)),
    `listen ${path}`,
  );
  try {
    if (libc.bind(fd.unsafeFd, sa, sa.byteLength) === -1) {
      const e = lastErrno();
      if (e !== Errno.EADDRINUSE) throw new ErrnoError("bind", e, path);
      // Something is at the path: a live server, a stale socket, or not a socket at all.
      let info: Deno.FileInfo;
      try {
        info = Deno.lstatSync(path);
      } catch {
        throw new ErrnoError("bind", e, path);
      }
      if (!info.isSocket) throw new ErrnoError("bind", e, `${path} exists and is not a socket`);
      let live = false;
      try {
        connectUnix(path).close();
        live = true;
      } catch { /* ECONNREFUSED: stale */ }
      if (live) throw new ErrnoError("bind", e, `${path}: another server is listening there`);
      unlinkPath(path);
      check("bind", libc.bind(fd.unsafeFd, sa, sa.byteLength), path);
    }
    check("chmod", libc.chmod(cstr(path), options.mode ?? 0o600), path);
    check("listen", libc.listen(fd.unsafeFd, options.backlog ?? 128), path);
    if (options.nonBlocking ?? true) fd.setNonBlocking(true);
  } catch (e) {
    fd.close();
    throw e;
  }
  return new UnixListener(fd, path, options);
}

/** Adopts an inherited listening socket (systemd LISTEN_FDS, --fd=N); its path is not ours to unlink. */
export function adoptListener(fd: OwnedFd, options: SocketOptions = {}): UnixListener {
  fd.setNonBlocking(options.nonBlocking ?? true);
  return new UnixListener(fd, null, options);
}

/**
 * A datagram address: a path, or `@name` for the abstract namespace (as systemd's NOTIFY_SOCKET
 * may be), with its exact length.
 */
function datagramAddress(path: string): Uint8Array<ArrayBuffer> {
  if (!path.startsWith("@")) return sockaddrUn(path);
  const name = new TextEncoder().encode(path.slice(1));
  if (name.length + 1 > SOCKADDR_UN.pathMax) {
    throw new ErrnoError(
      "connect",
      36,
      `${path}: abstract socket name longer than ${SOCKADDR_UN.pathMax - 1} bytes`,
    );
  }
  const sa = new Uint8Array(SOCKADDR_UN.path + 1 + name.length); // sun_path[0] = 0, no terminator
  new DataView(sa.buffer).setUint16(SOCKADDR_UN.family, AF_UNIX, true);
  sa.set(name, SOCKADDR_UN.path + 1);
  return sa;
}

/**
 * Sends one datagram to the UNIX datagram socket at `path` (or `@abstract`), from a socket made
 * for it and closed again. Throws ErrnoError (ENOENT, ECONNREFUSED, EAGAIN...).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 *
 * const dir = Deno.makeTempDirSync();
 * using rx = bindDatagram(`${dir}/notify.sock`); // what systemd listens on (NOTIFY_SOCKET)
 * sendDatagram(`${dir}/notify.sock`, new TextEncoder().encode("READY=1"));
 * assert.equal(new TextDecoder().decode(rx.receive()!), "READY=1");
 * assert.equal(rx.receive(), null); // nothing more waiting
 * Deno.removeSync(dir, { recursive: true });
 * ```
 */
export function sendDatagram(path: string, data: Uint8Array): void {
  const sa = datagramAddress(path);
  using fd = OwnedFd.unsafeAdopt(check("socket", libc.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)), path);
  check("connect", libc.connect(fd.unsafeFd, sa, sa.byteLength), path);
  const buf = new Uint8Array(data);
  const n = check("send", libc.write(fd.unsafeFd, buf, BigInt(buf.byteLength)), path);
  if (Number(n) !== buf.byteLength) {
    throw new ErrnoError("send", Errno.EAGAIN, `${path}: short datagram (${n} of ${buf.byteLength})`);
  }
}

/** A bound, non-blocking UNIX datagram socket (a NOTIFY_SOCKET for tests and supervisors). */
export class DatagramSocket {
  readonly path: string;
  readonly fd: OwnedFd;
  readonly #buf = new Uint8Array(65536);

  constructor(path: string, fd: OwnedFd) {
    this.path = path;
    this.fd = fd;
  }

  /** The next datagram, or null when none is waiting. */
  receive(): Uint8Array | null {
    const n = libc.read(this.fd.unsafeFd, this.#buf, BigInt(this.#buf.byteLength));
    if (n < 0) {
      const e = lastErrno();
      if (e === Errno.EAGAIN) return null;
      throw new ErrnoError("recv", e, this.path);
    }
    return this.#buf.slice(0, Number(n));
  }

  /** Closes the socket and removes its path. */
  close(): void {
    if (this.fd.closed) return;
    this.fd.close();
    try {
      Deno.removeSync(this.path);
    } catch { /* gone already */ }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** Binds a non-blocking UNIX datagram socket at `path`. */
export function bindDatagram(path: string): DatagramSocket {
  const sa = sockaddrUn(path);
  const fd = OwnedFd.unsafeAdopt(
    check("socket", libc.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)),
    `datagram socket ${path}`,
  );
  try {
    check("bind", libc.bind(fd.unsafeFd, sa, sa.byteLength), path);
  } catch (e) {
    fd.close();
    throw e;
  }
  return new DatagramSocket(path, fd);
}
