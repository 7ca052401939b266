/**
 * The fds a fuzz case attaches to messages, by role: the right ones (guest RAM memfd, kick/call/err
 * eventfds of the case's front-end, an inflight memfd, a hot-added region) and wrong ones (memfds
 * smaller than the region declared for them, a socket, a FIFO, regular files, an eventfd where
 * memory is expected, /dev/null, /dev/zero, a directory). Wrong ones live for the whole run; the
 * per-case ones are made fresh for each case so every case starts from zeroed memory.
 * @module
 */
import {
  EventFd,
  ftruncate,
  type MappedRegion,
  mapShared,
  memfdCreate,
  OpenFlags,
  openPath,
  type OwnedFd,
  socketPair,
  type UnixSocket,
} from "../../ffi/mod.ts";
import type { VhostUserFrontend } from "../../tests/helpers/vhost_frontend.ts";
import type { Layout } from "./layout.ts";

/** A role name: "mem", "kick0", "call1", "inflight", "hot", "memfd-page", "fifo", ... */
export type FdRole = string;

/** Wrong fds for a memory region (SET_MEM_TABLE, ADD_MEM_REG). */
export const WRONG_FOR_MEMORY: readonly FdRole[] = [
  "memfd-empty",
  "memfd-page",
  "memfd-half",
  "memfd-short",
  "socket",
  "fifo",
  "file-page",
  "file-ro",
  "eventfd",
  "devnull",
  "devzero",
  "dir",
  "kick0",
];
/** Wrong fds for SET_INFLIGHT_FD. */
export const WRONG_FOR_INFLIGHT: readonly FdRole[] = [
  "inflight-short",
  "memfd-empty",
  "socket",
  "fifo",
  "file-page",
  "file-ro",
  "eventfd",
  "devnull",
  "dir",
];
/** Wrong fds for a kick, call or err eventfd. */
export const WRONG_FOR_EVENT: readonly FdRole[] = [
  "mem",
  "memfd-page",
  "socket",
  "fifo",
  "file",
  "file-ro",
  "devnull",
  "devzero",
  "dir",
];

/** The fds that stay for a whole run. */
export class FdPool {
  readonly #fds = new Map<FdRole, OwnedFd>();
  readonly #what = new Map<FdRole, string>();
  readonly #pair: [UnixSocket, UnixSocket];
  readonly #eventfd: EventFd;

  private constructor(pair: [UnixSocket, UnixSocket], ev: EventFd) {
    this.#pair = pair;
    this.#eventfd = ev;
  }

  /**
   * Makes the wrong-kind fds; files go to `dir` (removed with it).
   * @example
   * const pool = await FdPool.create(dir, layout);
   * try { pool.get("fifo"); } finally { pool.close(); }
   */
  static async create(dir: string, layout: Layout): Promise<FdPool> {
    const pair = socketPair();
    const ev = new EventFd({ label: "fuzz foreign eventfd" });
    const pool = new FdPool(pair, ev);
    try {
      pool.#add("socket", pair[0].fd, "one end of a UNIX socketpair");
      pool.#add("eventfd", ev.fd, "an eventfd");
      const memfd = (name: string, size: number) => {
        const f = memfdCreate(`mpq-fuzz-${name}`);
        pool.#add(name, f, `memfd of ${size} bytes`);
        if (size > 0) ftruncate(f, size);
      };
      memfd("memfd-empty", 0);
      memfd("memfd-page", 4096);
      memfd("memfd-half", layout.ramSize / 2);
      memfd("memfd-short", layout.ramSize - 4096);
      memfd("inflight-short", 64);
      const fifo = `${dir}/fifo`;
      const mk = await new Deno.Command("mkfifo", { args: [fifo], stdout: "null", stderr: "piped" }).output();
      if (!mk.success) throw new Error(`mkfifo ${fifo}: ${new TextDecoder().decode(mk.stderr)}`);
      pool.#add("fifo", openPath(fifo, OpenFlags.O_RDWR | OpenFlags.O_NONBLOCK), "a FIFO");
      const file = (name: string, size: number, flags: number, what: string) => {
        const path = `${dir}/${name}`;
        const f = openPath(path, OpenFlags.O_RDWR | OpenFlags.O_CREAT);
        try {
          ftruncate(f, size);
        } finally {
          f.close();
        }
        pool.#add(name, openPath(path, flags), what);
      };
      file("file", layout.ramSize, OpenFlags.O_RDWR, `a regular file of ${layout.ramSize} bytes`);
      file("file-page", 4096, OpenFlags.O_RDWR, "a regular file of 4096 bytes");
      file(
        "file-ro",
        layout.ramSize,
        OpenFlags.O_RDONLY,
        `a read-only regular file of ${layout.ramSize} bytes`,
      );
      pool.#add("devnull", openPath("/dev/null", OpenFlags.O_RDWR), "/dev/null");
      pool.#add("devzero", openPath("/dev/zero", OpenFlags.O_RDWR), "/dev/zero");
      pool.#add("dir", openPath(dir, OpenFlags.O_RDONLY | 0o200000 /* O_DIRECTORY */), "a directory");
    } catch (e) {
      pool.close();
      throw e;
    }
    return pool;
  }

  #add(role: FdRole, fd: OwnedFd, what: string): void {
    this.#fds.set(role, fd);
    this.#what.set(role, what);
  }

  /** The fd of a pool role, or undefined. */
  get(role: FdRole): OwnedFd | undefined {
    return this.#fds.get(role);
  }

  /** What a pool role is ("memfd of 4096 bytes"). */
  what(role: FdRole): string | undefined {
    return this.#what.get(role);
  }

  /** Closes every fd (the socketpair and eventfd with their owners). */
  close(): void {
    for (const [role, fd] of this.#fds) if (role !== "socket" && role !== "eventfd") fd.close();
    this.#fds.clear();
    this.#pair[0].close();
    this.#pair[1].close();
    this.#eventfd.close();
  }
}

/**
 * The fds of one case: its front-end's (RAM memfd, kick/call/err per queue), a fresh inflight
 * memfd, and a fresh hot-pluggable memfd mapped here too (requests put data in it).
 */
export class CaseFds {
  readonly inflight: OwnedFd;
  readonly hot: OwnedFd;
  readonly hotMap: MappedRegion;
  readonly #fe: VhostUserFrontend;
  readonly #pool: FdPool;

  constructor(fe: VhostUserFrontend, pool: FdPool, layout: Layout) {
    this.#fe = fe;
    this.#pool = pool;
    const inflight = memfdCreate("mpq-fuzz-inflight");
    let hot: OwnedFd | null = null;
    try {
      ftruncate(inflight, layout.inflightSize);
      hot = memfdCreate("mpq-fuzz-hot");
      ftruncate(hot, layout.hot.size);
      this.hotMap = mapShared(hot, layout.hot.size);
    } catch (e) {
      hot?.close();
      inflight.close();
      throw e;
    }
    this.inflight = inflight;
    this.hot = hot;
  }

  /** The fd for a role (throws on an unknown role: a plan bug). */
  get(role: FdRole): OwnedFd {
    const fe = this.#fe;
    if (role === "mem") return fe.ram.memfd;
    if (role === "inflight") return this.inflight;
    if (role === "hot") return this.hot;
    const m = /^(kick|call|err)(\d+)$/.exec(role);
    if (m) {
      const q = fe.queues[Number(m[2])];
      if (q) return q[m[1] as "kick" | "call" | "err"].fd;
    }
    const f = this.#pool.get(role);
    if (!f) throw new RangeError(`unknown fd role ${role}`);
    return f;
  }

  /** Unmaps and closes the case's own fds (the front-end closes its own). */
  close(): void {
    this.hotMap.close();
    this.hot.close();
    this.inflight.close();
  }
}
