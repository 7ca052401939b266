/**
 * The ivshmem server: shared memory plus a UNIX socket; every peer gets the shm fd and
 * `vectors` eventfds, and learns every other peer's eventfds (protocol.ts has the order).
 *
 * Unlike contrib ivshmem-server it never drops a message: sends are nonblocking and what the
 * socket does not take waits in a per-peer queue that EPOLLOUT flushes. A peer that stops
 * reading is disconnected once its queue passes a bound, so it never stalls the others, and a
 * failure while setting up one peer closes that connection only.
 * @module
 */
import {
  type ErrnoError,
  EventFd,
  fstat,
  ftruncate,
  listenUnix,
  mkstempIn,
  OpenFlags,
  openPath,
  type OwnedFd,
  type Reactor,
  type Readiness,
  ShmFlags,
  shmOpen,
  shmUnlink,
  type UnixListener,
  type UnixSocket,
  unlinkPath,
  type Watch,
} from "../../ffi/mod.ts";
import { SendQueue } from "./_send_queue.ts";
import {
  encodeMessage,
  joinPlan,
  leavePlan,
  MAX_VECTORS,
  MESSAGE_SIZE,
  PeerIdAllocator,
  type PlannedMessage,
  roundUpPowerOfTwo,
} from "./protocol.ts";

/** Where the shared memory comes from: a POSIX shm object (`-M`) or a file in a directory (`-m`). */
export type ShmSource = { name: string } | { dir: string };

/** Options for IvshmemServer.open. */
export interface ServerOptions {
  /** The UNIX socket path to listen on. */
  socketPath: string;
  /** The shared memory backing. */
  shm: ShmSource;
  /** Requested size in bytes; rounded up to a power of two. */
  size: number;
  /** Interrupt vectors per peer (1..64). */
  vectors: number;
  /** File mode of the socket (default 0o600). */
  mode?: number;
  /** Debug lines (verbose mode). */
  log?: (line: string) => void;
  /**
   * Most messages queued for one peer before it is disconnected as not reading. Default:
   * 4096 + 2 × vectors × peers (a joining peer legitimately gets vectors × peers at once).
   */
  queueLimit?: number;
}

/** Counters for logs, tests and the benchmark. */
export interface ServerStats {
  /** Peers connected now. */
  peers: number;
  /** Peers that completed their join. */
  joined: number;
  /** Peers that left or were disconnected. */
  left: number;
  /** Peers disconnected because their queue passed the bound. */
  slow: number;
  /** Connections closed because setting them up failed. */
  setupFailures: number;
  /** Messages that went through a queue instead of straight out. */
  queued: number;
  /** Largest queue seen. */
  maxQueue: number;
}

function openReserve(): OwnedFd | null {
  try {
    return openPath("/dev/null", OpenFlags.O_RDONLY);
  } catch {
    return null;
  }
}

/** The largest size contrib ivshmem-server tries when a hugetlbfs refuses smaller ones. */
const MAX_HUGEPAGE_SIZE = 2 ** 30;
const ACCEPTS_PER_TURN = 64;
const ACCEPT_PAUSE_MS = 100;

/**
 * Eventfds of one peer, closed when the peer is gone and no queued message still carries one.
 * `onFree` runs then (the server forgets the set).
 */
class VectorSet {
  readonly fds: EventFd[];
  readonly #onFree: () => void;
  #refs = 1;
  constructor(fds: EventFd[], onFree: () => void) {
    this.fds = fds;
    this.#onFree = onFree;
  }
  hold(): void {
    this.#refs++;
  }
  release(): void {
    if (--this.#refs > 0) return;
    for (const f of this.fds) f.close();
    this.#onFree();
  }
}

/** Tag of a queued message: no fd, the shm fd, or vector `tag - TAG_VECTOR` of the peer named by its value. */
const TAG_NONE = 0;
const TAG_SHM = 1;
const TAG_VECTOR = 2;

interface Peer {
  id: number;
  sock: UnixSocket;
  watch: Watch | null;
  vectors: VectorSet;
  queue: SendQueue;
  writing: boolean;
  /** Set when it is being dropped: nothing more is sent to it. */
  gone: boolean;
}

/** A failure inside one peer's callback: the reactor's onError drops that peer. */
export class PeerFailure extends Error {
  readonly peerId: number;
  constructor(peerId: number, cause: unknown) {
    super(`peer ${peerId}: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
    this.name = "PeerFailure";
    this.peerId = peerId;
  }
}

function isErrno(e: unknown, ...codes: string[]): e is ErrnoError {
  return e instanceof Error && e.name === "ErrnoError" && codes.includes((e as ErrnoError).code);
}

/** The shared memory a server serves. */
export interface SharedMemory {
  fd: OwnedFd;
  /** Its size in bytes (a power of two). */
  size: number;
  /**
   * Whether this server created the `-M` object (O_CREAT|O_EXCL) and so removes it on exit; false
   * for an object that already existed (used as it is, left in place) and for `-m` files (unlinked
   * at once).
   */
  created: boolean;
}

/**
 * A `-M` object exists already with another size than the one asked for. The server never resizes
 * an object it did not create (someone else may have it mapped: shrinking it kills them with
 * SIGBUS), so it refuses to start.
 */
export class ShmSizeMismatchError extends Error {
  /** The shm object's name as given. */
  readonly shmName: string;
  /** Its current size in bytes. */
  readonly actual: number;
  /** The size the server would serve (the request rounded up to a power of two). */
  readonly expected: number;
  constructor(shmName: string, actual: number, expected: number, requested: number) {
    const asked = requested === expected
      ? `${expected}`
      : `${expected} (${requested} rounded up to a power of two)`;
    super(
      `shm object ${shmName} (/dev/shm/${shmName.replace(/^\//, "")}) already exists with ${actual} bytes, ` +
        `expected ${asked}; mpq resizes only objects it creates: remove it or ask for its size`,
    );
    this.name = "ShmSizeMismatchError";
    this.shmName = shmName;
    this.actual = actual;
    this.expected = expected;
  }
}

/** The inode of `/dev/shm/NAME` (where Linux keeps POSIX shm objects), null if there is none. */
function shmInode(name: string): number | null {
  try {
    return Deno.statSync(`/dev/shm/${name.replace(/^\//, "")}`).ino;
  } catch {
    return null;
  }
}

/** Sets a new file's size, doubling on a hugetlbfs that refuses (EINVAL) up to 1 GiB as contrib does. */
function sizeNewFile(fd: OwnedFd, size: number): number {
  if (fstat(fd).size === size) return size;
  while (true) {
    try {
      ftruncate(fd, size);
      return size;
    } catch (e) {
      if (!isErrno(e, "EINVAL") || size * 2 > Math.max(MAX_HUGEPAGE_SIZE, size)) throw e;
      size *= 2;
    }
  }
}

/**
 * A `-M` object: created (O_CREAT|O_EXCL) and sized when missing; used as it is when it exists with
 * the size asked for; refused (ShmSizeMismatchError) when it exists with another size.
 */
function openShmObject(name: string, requested: number): SharedMemory {
  const size = roundUpPowerOfTwo(requested);
  // An existing object can vanish between the two opens (its owner removed it): then try again.
  for (let attempt = 1;; attempt++) {
    let fd: OwnedFd;
    try {
      fd = shmOpen(name, ShmFlags.O_CREAT | ShmFlags.O_EXCL | ShmFlags.O_RDWR, 0o600);
    } catch (e) {
      if (!isErrno(e, "EEXIST")) throw e;
      let existing: OwnedFd;
      try {
        existing = shmOpen(name, ShmFlags.O_RDWR);
      } catch (e2) {
        if (isErrno(e2, "ENOENT") && attempt < 3) continue;
        throw e2;
      }
      let actual: number;
      try {
        actual = fstat(existing).size;
      } catch (e2) {
        existing.close();
        throw e2;
      }
      if (actual !== size) {
        existing.close();
        throw new ShmSizeMismatchError(name, actual, size, requested);
      }
      return { fd: existing, size, created: false };
    }
    try {
      return { fd, size: sizeNewFile(fd, size), created: true };
    } catch (e) {
      fd.close();
      shmUnlink(name);
      throw e;
    }
  }
}

/**
 * Opens the shared memory. A `-M` object that does not exist is created and sized to the next
 * power of two (`created`: the server removes it on exit); one that exists is used only if it has
 * exactly that size, and is never resized or removed (ShmSizeMismatchError otherwise). A `-m`
 * directory gets a new file, unlinked at once and sized (doubling on a hugetlbfs that refuses, up
 * to 1 GiB, as contrib ivshmem-server does).
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { shmUnlink } from "../../ffi/mod.ts";
 *
 * const name = `ivshmem-example-${Deno.pid}`;
 * const { fd, size, created } = openSharedMemory({ name }, 3 << 20);
 * assert.equal(size, 4 << 20); // rounded up to a power of two
 * assert.equal(created, true); // it did not exist: this server removes it on exit
 * fd.close();
 * shmUnlink(name);
 * ```
 */
export function openSharedMemory(source: ShmSource, requested: number): SharedMemory {
  if ("name" in source) return openShmObject(source.name, requested);
  const made = mkstempIn(source.dir, "ivshmem.");
  const fd = made.fd;
  try {
    unlinkPath(made.path);
    return { fd, size: sizeNewFile(fd, roundUpPowerOfTwo(requested)), created: false };
  } catch (e) {
    fd.close();
    throw e;
  }
}

/**
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { Reactor } from "../../ffi/mod.ts";
 * import { IvshmemClient } from "./client.ts";
 *
 * const dir = Deno.makeTempDirSync();
 * const reactor = new Reactor({ onError: (e) => server.handleError(e) }); // a failing peer is dropped
 * const server = IvshmemServer.open(reactor, {
 *   socketPath: `${dir}/ivshmem.sock`,
 *   shm: { dir: "/dev/shm" }, // or { name: "ivshmem" }, like -M
 *   size: 1 << 20,
 *   vectors: 2,
 * });
 * const shutdown = () => {
 *   server.close(); // peers see end of file; the socket is unlinked
 *   reactor.stop();
 * };
 * reactor.onSignal("SIGTERM", shutdown);
 * const running = reactor.run();
 * const peer = await IvshmemClient.connect(reactor, server.socketPath);
 * assert.deepEqual(server.peerIds(), [peer.id]);
 * peer.close();
 * shutdown();
 * await running;
 * reactor.close();
 * Deno.removeSync(dir);
 * ```
 */
export class IvshmemServer {
  /** The shared memory size after rounding. */
  readonly size: number;
  readonly vectors: number;
  readonly socketPath: string;
  readonly #reactor: Reactor;
  readonly #listener: UnixListener;
  readonly #listenWatch: Watch;
  readonly #shm: OwnedFd;
  /** The `-M` object this server created and removes on exit (null: nothing to remove). */
  readonly #shmName: string | null;
  /** Its inode just after creation: on exit, an object put there by someone else is left alone. */
  readonly #shmIno: number | null;
  readonly #log: (line: string) => void;
  readonly #queueLimit: number | undefined;
  readonly #ids = new PeerIdAllocator();
  /** Connected peers in join order. */
  readonly #peers = new Map<number, Peer>();
  readonly #drops: Peer[] = [];
  /**
   * Every peer's eventfds by id, kept while a queued message may still carry one (a peer that
   * left stays here until its messages went out); a new peer never gets an id still in here.
   */
  readonly #sets = new Map<number, VectorSet>();
  readonly #scratch = new Uint8Array(MESSAGE_SIZE);
  #dropping = false;
  #pauseTimer: ReturnType<typeof setTimeout> | undefined;
  /** One fd held back for refusing peers cleanly when the process is out of fds. */
  #reserve: OwnedFd | null = openReserve();
  #closed = false;
  readonly #stats: ServerStats = {
    peers: 0,
    joined: 0,
    left: 0,
    slow: 0,
    setupFailures: 0,
    queued: 0,
    maxQueue: 0,
  };

  private constructor(
    reactor: Reactor,
    options: ServerOptions,
    shm: SharedMemory,
    listener: UnixListener,
  ) {
    this.#reactor = reactor;
    this.size = shm.size;
    this.#shm = shm.fd;
    this.#shmName = shm.created && "name" in options.shm ? options.shm.name : null;
    this.#shmIno = this.#shmName === null ? null : shmInode(this.#shmName);
    this.vectors = options.vectors;
    this.socketPath = options.socketPath;
    this.#log = options.log ?? (() => {});
    this.#queueLimit = options.queueLimit;
    this.#listener = listener;
    this.#listenWatch = reactor.add(listener.fd, { readable: true }, () => this.#onAccept());
  }

  /**
   * Opens the shared memory (openSharedMemory: creates a missing `-M` object, uses an existing one
   * of the right size, refuses one of another size), listens on the socket and registers with
   * `reactor`. Errors name the path or shm name and the errno; nothing it created is left behind
   * when it throws, and an object it did not create is never resized or removed.
   */
  static open(reactor: Reactor, options: ServerOptions): IvshmemServer {
    if (!Number.isInteger(options.vectors) || options.vectors < 1 || options.vectors > MAX_VECTORS) {
      throw new RangeError(`vectors must be 1..${MAX_VECTORS}: got ${options.vectors}`);
    }
    // The socket first: a live server on the path is refused before we touch its shm object.
    const listener = listenUnix(options.socketPath, { mode: options.mode ?? 0o600, backlog: 128, maxFds: 1 });
    let shm: SharedMemory;
    try {
      shm = openSharedMemory(options.shm, options.size);
    } catch (e) {
      listener.close();
      throw e;
    }
    if ("name" in options.shm) {
      options.log?.(
        shm.created
          ? `shm ${options.shm.name}: created, ${shm.size} bytes; removed on exit`
          : `shm ${options.shm.name}: exists with ${shm.size} bytes; used as it is and left in place on exit`,
      );
    }
    try {
      return new IvshmemServer(reactor, options, shm, listener);
    } catch (e) {
      listener.close();
      shm.fd.close();
      if (shm.created && "name" in options.shm) shmUnlink(options.shm.name);
      throw e;
    }
  }

  /** Counters so far. */
  get stats(): Readonly<ServerStats> {
    return { ...this.#stats, peers: this.#peers.size };
  }

  /** Ids of the connected peers in join order. */
  peerIds(): number[] {
    return [...this.#peers.keys()];
  }

  /**
   * For the reactor's onError: a PeerFailure drops that peer; anything else is logged.
   * The server keeps serving either way.
   */
  handleError(error: unknown): void {
    if (error instanceof PeerFailure) {
      this.#log(`${error.message}; disconnecting it`);
      const peer = this.#peers.get(error.peerId);
      if (peer) this.#drop(peer);
      return;
    }
    this.#log(`error: ${error instanceof Error ? error.message : String(error)}`);
  }

  #onAccept(): void {
    for (let i = 0; i < ACCEPTS_PER_TURN && !this.#closed; i++) {
      let sock: UnixSocket | null;
      try {
        sock = this.#listener.accept();
      } catch (e) {
        // accept4 reports EMFILE before it looks for a connection: refuseOne says if one waited.
        const refused = isErrno(e, "EMFILE", "ENFILE") ? this.#refuseOne() : "no reserve";
        if (refused === "refused") continue;
        if (refused === "none waiting") return;
        this.#log(`cannot accept: ${e instanceof Error ? e.message : e}`);
        if (isErrno(e, "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")) this.#pauseAccepting();
        return;
      }
      if (sock === null) return;
      try {
        this.#join(sock);
      } catch (e) {
        this.#stats.setupFailures++;
        this.#log(`cannot set up new peer: ${e instanceof Error ? e.message : e}; connection closed`);
      }
    }
  }

  /**
   * Out of fds: give up the reserve fd, accept the waiting peer and close it at once, so it sees
   * end of file instead of waiting in the backlog; then take the reserve again.
   */
  #refuseOne(): "refused" | "none waiting" | "no reserve" {
    if (this.#reserve === null) return "no reserve";
    this.#reserve.close();
    this.#reserve = null;
    let result: "refused" | "none waiting" | "no reserve" = "no reserve";
    try {
      const sock = this.#listener.accept();
      if (sock) {
        sock.close();
        this.#stats.setupFailures++;
        this.#log("out of fds: refused a new peer (connection closed)");
        result = "refused";
      } else {
        result = "none waiting";
      }
    } catch { /* still out of fds: the caller pauses */ }
    this.#reserve = openReserve();
    return result;
  }

  /** Out of fds: stop accepting for a moment instead of spinning on a readable listener. */
  #pauseAccepting(): void {
    if (this.#pauseTimer !== undefined) return;
    this.#listenWatch.modify({});
    this.#pauseTimer = setTimeout(() => {
      this.#pauseTimer = undefined;
      if (!this.#closed) this.#listenWatch.modify({ readable: true });
    }, ACCEPT_PAUSE_MS);
  }

  #join(sock: UnixSocket): void {
    let id: number;
    try {
      id = this.#ids.allocate();
      while (this.#sets.has(id)) {
        const busy = id;
        id = this.#ids.allocate();
        this.#ids.release(busy);
      }
    } catch (e) {
      sock.close();
      throw e;
    }
    const fds: EventFd[] = [];
    let peer: Peer;
    try {
      for (let v = 0; v < this.vectors; v++) fds.push(new EventFd({ label: `peer ${id} vector ${v}` }));
      peer = {
        id,
        sock,
        watch: null,
        vectors: new VectorSet(fds, () => {
          if (this.#sets.get(id) === peer.vectors) this.#sets.delete(id);
        }),
        queue: new SendQueue(),
        writing: false,
        gone: false,
      };
      peer.watch = this.#reactor.add(sock.fd, { readable: true }, (r) => this.#onPeer(peer, r));
    } catch (e) {
      for (const f of fds) f.close();
      sock.close();
      this.#ids.release(id);
      throw e;
    }
    const existing = [...this.#peers.keys()];
    this.#peers.set(id, peer);
    this.#sets.set(id, peer.vectors);
    this.#stats.joined++;
    this.#log(`new peer id = ${id}`);
    this.#execute(joinPlan(id, existing, this.vectors));
    this.#processDrops();
  }

  #execute(plan: readonly PlannedMessage[]): void {
    for (const m of plan) {
      const to = this.#peers.get(m.to);
      if (!to || to.gone) continue;
      let tag = TAG_NONE;
      if (m.fd?.kind === "shm") {
        tag = TAG_SHM;
      } else if (m.fd?.kind === "vector") {
        // A vector message's value is always its owner's id: the tag needs only the index.
        if (m.fd.peer !== m.value) throw new Error(`vector of peer ${m.fd.peer} sent as ${m.value}`);
        if (!this.#sets.has(m.value)) continue;
        tag = TAG_VECTOR + m.fd.vector;
      }
      this.#send(to, m.value, tag);
    }
  }

  /** The fd a message carries. */
  #fdFor(value: number, tag: number): OwnedFd | null {
    if (tag === TAG_NONE) return null;
    if (tag === TAG_SHM) return this.#shm;
    return this.#sets.get(value)!.fds[tag - TAG_VECTOR].fd;
  }

  #limit(): number {
    return this.#queueLimit ?? 4096 + 2 * this.vectors * this.#peers.size;
  }

  /** Sends now if nothing is queued and the socket takes it; else queues (holding the eventfds). */
  #send(peer: Peer, value: number, tag: number): void {
    if (peer.queue.length === 0) {
      let n: number | null;
      try {
        const fd = this.#fdFor(value, tag);
        n = peer.sock.sendMsg(encodeMessage(value, this.#scratch), fd ? [fd] : []);
      } catch (e) {
        this.#log(`peer ${peer.id}: ${e instanceof Error ? e.message : e}`);
        this.#scheduleDrop(peer);
        return;
      }
      if (n === MESSAGE_SIZE) return;
      if (n !== null) {
        // A partial write took the fd with its first byte; the rest goes later without it.
        peer.queue.push(value, TAG_NONE);
        peer.queue.sent = n;
        this.#queued(peer);
        return;
      }
    }
    if (tag >= TAG_VECTOR) this.#sets.get(value)!.hold();
    peer.queue.push(value, tag);
    this.#queued(peer);
  }

  #queued(peer: Peer): void {
    this.#stats.queued++;
    const depth = peer.queue.length;
    if (depth > this.#stats.maxQueue) this.#stats.maxQueue = depth;
    if (depth > this.#limit()) {
      this.#log(`peer ${peer.id}: not reading, ${depth} messages queued; disconnecting it`);
      this.#stats.slow++;
      this.#scheduleDrop(peer);
      return;
    }
    if (!peer.writing) {
      peer.writing = true;
      peer.watch?.modify({ readable: true, writable: true });
    }
  }

  /** Writes queued messages until the socket is full or the queue is empty. */
  #flush(peer: Peer): void {
    const q = peer.queue;
    while (q.length > 0) {
      const value = q.headValue;
      const tag = q.headTag;
      const bytes = encodeMessage(value, this.#scratch);
      const data = q.sent > 0 ? bytes.subarray(q.sent) : bytes;
      const fd = this.#fdFor(value, tag);
      const n = peer.sock.sendMsg(data, fd ? [fd] : []);
      if (n === null) return;
      if (tag >= TAG_VECTOR) this.#sets.get(value)!.release();
      q.headTag = TAG_NONE;
      if (n < data.byteLength) {
        q.sent += n;
        continue;
      }
      q.shift();
    }
    peer.writing = false;
    peer.watch?.modify({ readable: true });
  }

  #onPeer(peer: Peer, r: Readiness): void {
    if (peer.gone) return;
    if (r.readable || r.hangup || r.error) {
      // The protocol is one-way: any data, end of file or error means the peer left.
      this.#log(`peer ${peer.id} ${r.readable && !r.hangup ? "sent data" : "hung up"}`);
      this.#scheduleDrop(peer);
      this.#processDrops();
      return;
    }
    if (r.writable) {
      try {
        this.#flush(peer);
      } catch (e) {
        throw new PeerFailure(peer.id, e);
      }
    }
  }

  #scheduleDrop(peer: Peer): void {
    if (peer.gone) return;
    peer.gone = true;
    this.#drops.push(peer);
  }

  #drop(peer: Peer): void {
    this.#scheduleDrop(peer);
    this.#processDrops();
  }

  /** Frees dropped peers and tells the others; drops caused by those messages are handled too. */
  #processDrops(): void {
    if (this.#dropping) return;
    this.#dropping = true;
    try {
      while (this.#drops.length > 0) {
        const peer = this.#drops.shift()!;
        this.#free(peer);
        this.#execute(leavePlan(peer.id, [...this.#peers.keys()]));
      }
    } finally {
      this.#dropping = false;
    }
  }

  #free(peer: Peer): void {
    peer.gone = true;
    if (this.#peers.get(peer.id) !== peer) return;
    this.#peers.delete(peer.id);
    this.#ids.release(peer.id);
    this.#stats.left++;
    this.#log(`free peer ${peer.id}`);
    peer.watch?.remove();
    peer.sock.close();
    peer.queue.drain((value, tag) => {
      if (tag >= TAG_VECTOR) this.#sets.get(value)!.release();
    });
    peer.vectors.release();
  }

  /**
   * Closes every connection (peers see end of file), the listener (unlinking the socket path),
   * the shared memory, and shm_unlinks a `-M` object this server created (one that existed before
   * it started, or replaced its own meanwhile, stays). Idempotent. With few peers, each is first
   * told, best effort, that the others left.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#pauseTimer !== undefined) clearTimeout(this.#pauseTimer);
    this.#reserve?.close();
    this.#reserve = null;
    this.#listenWatch.remove();
    const peers = [...this.#peers.values()];
    const tell = peers.length <= 1024;
    for (const peer of peers) {
      this.#free(peer);
      if (!tell) continue;
      const bytes = encodeMessage(peer.id);
      for (const other of this.#peers.values()) {
        if (other.queue.length !== 0) continue;
        try {
          other.sock.sendMsg(bytes);
        } catch { /* it is going too */ }
      }
    }
    this.#listener.close();
    this.#shm.close();
    if (this.#shmName !== null) {
      const ino = shmInode(this.#shmName);
      if (ino !== null && this.#shmIno !== null && ino !== this.#shmIno) {
        this.#log(
          `shm ${this.#shmName} is another object now (not the one this server created): left in place`,
        );
        return;
      }
      try {
        shmUnlink(this.#shmName);
      } catch (e) {
        this.#log(`cannot remove shm ${this.#shmName}: ${e instanceof Error ? e.message : e}`);
      }
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
